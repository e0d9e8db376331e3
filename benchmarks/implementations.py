"""The implementations a benchmark compares, side by side in one run.

- reference         the literal formula (materialised per-sample kernels, grouped conv)
- nvlabs            NVlabs' plain-PyTorch recipe (scale activations, one dense conv,
                    scale again) with the low-rank branch in PyTorch (benchmarks.nvlabs_style)
- torch             the torch backend (the separated form in PyTorch ops)
- compile-reference torch.compile of the reference
- compile-nvlabs    torch.compile of the NVlabs-style path
- compile-torch     torch.compile of the torch backend
- triton            the fused Triton kernels
- compile-triton    torch.compile of the network around the Triton custom ops (Inductor
                    fuses the torch glue between them; the kernels stay opaque)
- <name>+graph      the whole-generator case (inference, or a training step: forward and
                    backward) captured as one CUDA graph and replayed: no host time per op

"Plain PyTorch" (the family the targets compare against) is every implementation but
the Triton ones. A wrong result from an implementation whose `fatal_on_wrong` is set
(Triton) stops the run; any other wrong result is recorded as "wrong", without a time,
and makes the run exit non-zero at the end.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

from refinestyle_kernels.ops.modulated_conv2d import styled_conv2d

from benchmarks.nvlabs_style import nvlabs_styled_conv2d


@dataclass(frozen=True)
class Implementation:
    """One way of computing the layer (and, through the generator's modules, the network).

    name: the label in every report.
    family: "reference", "plain" (any other plain-PyTorch path) or "fused" (Triton).
    backend: the op backend the generator's modules use ("reference", "torch", "triton").
    op: a replacement for `refinestyle_kernels.styled_conv2d` (same signature) or None to
        call the op with `backend`. During a generator case the replacement is patched
        into refinestyle_kernels.modules, where the generator's layers look the op up.
    compiled: wrap the whole case (layer or network forward) in torch.compile.
    cuda_graph: capture the case in a CUDA graph and replay it (generator cases: the
        forward, or forward and backward).
    needs_cuda: skip on machines without CUDA.
    fatal_on_wrong: a result that fails the correctness guard aborts the run.
    description: one line for the reports.
    """

    name: str
    family: str
    backend: str
    op: Callable | None = None
    compiled: bool = False
    cuda_graph: bool = False
    needs_cuda: bool = False
    fatal_on_wrong: bool = False
    description: str = ""

    def layer_op(self) -> Callable:
        """The callable with styled_conv2d's signature that runs one layer."""
        if self.op is not None:
            return self.op
        return functools.partial(styled_conv2d, backend=self.backend)

    @property
    def plain(self) -> bool:
        return self.family in ("reference", "plain")


REFERENCE = Implementation(
    "reference", "reference", "reference", description="literal formula: per-sample kernels, grouped conv"
)
NVLABS = Implementation(
    "nvlabs",
    "plain",
    "reference",
    op=nvlabs_styled_conv2d,
    description="NVlabs fused_modconv=False: scale x, one dense conv, scale by d; low-rank branch in PyTorch",
)
TORCH = Implementation("torch", "plain", "torch", description="torch backend: separated form in PyTorch ops")
TRITON = Implementation(
    "triton", "fused", "triton", needs_cuda=True, fatal_on_wrong=True, description="fused Triton kernels"
)


def compiled(implementation: Implementation) -> Implementation:
    return replace(
        implementation,
        name=f"compile-{implementation.name}",
        compiled=True,
        description=f"torch.compile of {implementation.name}",
    )


def graphed(implementation: Implementation) -> Implementation:
    return replace(
        implementation,
        name=f"{implementation.name}+graph",
        cuda_graph=True,
        needs_cuda=True,
        description=f"{implementation.name}, captured as one CUDA graph",
    )


def registry() -> dict[str, Implementation]:
    """Every known implementation by name, in report order."""
    base = [REFERENCE, NVLABS, TORCH, compiled(REFERENCE), compiled(NVLABS), compiled(TORCH), TRITON, compiled(TRITON)]
    # compiled and then captured: the fused glue and no host time (compile-<name>+graph)
    graphs = [graphed(impl) for impl in (REFERENCE, NVLABS, TORCH, TRITON, *(compiled(i) for i in (NVLABS, TORCH, TRITON)))]
    return {impl.name: impl for impl in base + graphs}


GPU_DEFAULT = (
    "reference",
    "nvlabs",
    "torch",
    "compile-reference",
    "compile-nvlabs",
    "compile-torch",
    "triton",
    "compile-triton",
    "reference+graph",
    "nvlabs+graph",
    "torch+graph",
    "triton+graph",
    "compile-nvlabs+graph",
    "compile-torch+graph",
    "compile-triton+graph",
)
CPU_DEFAULT = ("reference", "torch")  # the 3-minute budget; add nvlabs with --impls


def select(names: list[str]) -> list[Implementation]:
    """Implementations by name (ValueError naming the unknown ones)."""
    known = registry()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"implementations: unknown {unknown}; known: {list(known)}")
    return [known[name] for name in names]
