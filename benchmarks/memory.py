"""Peak memory of a call on any device, by following the tensors it creates.

On CUDA the suite reads the caching allocator's statistics
(torch.cuda.max_memory_allocated). The CPU allocator keeps none, and the CPU suite reports no
peak memory; the tests measure with `LiveBytes` instead: a TorchDispatchMode that sees every aten op run below
autograd, adds the bytes of each new storage an op returns, and subtracts them when the
storage is freed. Its peak is what the call itself allocated on top of what existed
before (the same quantity as the CUDA suite's `extra_bytes`), counted in whole storages:
no allocator rounding, no cuBLAS/cuDNN workspaces, nothing allocated outside aten.

On meta tensors the same accounting plans a training step's memory without a GPU and
without computing anything (`planned_generator_memory`; `python -m benchmarks.memory`).
"""
from __future__ import annotations

import argparse
import math
import sys
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.cases import GeneratorConfig, TokenSetting, parse_tokens
from benchmarks.implementations import Implementation, select
from benchmarks.workloads import patched_op


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created inside the mode that are still alive.

        with LiveBytes() as live:
            out = model(x); out.backward(grad)
        live.peak_bytes   # the most that was alive at once (outputs of views and in-place
                          # ops are not new storages and are not counted)
        live.live_bytes   # what is still alive now (e.g. the gradients and `out`)

    Storages that existed before the mode are never counted, also when an op returns a view
    of one. Works for CPU and CUDA tensors alike (one total over all devices).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        result = func(*args, **kwargs)
        for tensor in tree_flatten(result)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._tracked:  # a view or an in-place result
                continue
            nbytes = storage.nbytes()
            self._tracked.add(key)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            # the storage's Python object lives exactly as long as the storage (torch keeps it)
            weakref.finalize(storage, self._free, key, nbytes)
        return result


def peak_bytes_of(step: Callable[[], object]) -> tuple[object, int]:
    """Run step() under `LiveBytes`; returns (its result, the peak bytes it allocated)."""
    with LiveBytes() as live:
        result = step()
    return result, live.peak_bytes


# ----------------------------------------------------------------------------------------------
# Planning memory without a GPU: the meta device


def meta_training_step(
    generator: GeneratorConfig, batch: int, dtype: torch.dtype, tokens: TokenSetting, backend: str, backward: bool = True
):
    """The synthesis network and the inputs of one benchmark step, on meta tensors.

    Arguments as in `planned_generator_memory`; backend: the op backend of the network's
    layers. Returns (model, w_plus, refinement or None, grad_image): w+ and the tokens
    require gradients when backward is True, the weights never do.
    """
    from refinestyle.generator import Generator
    from refinestyle.refinement import Refinement

    with torch.device("meta"):
        model = Generator(
            generator.size, generator.style_dim, generator.n_mlp,
            channel_multiplier=generator.channel_multiplier, channel_max=generator.channel_max,
        ).to(dtype).requires_grad_(False)  # fmt: skip
        model.backend = backend
        num_latent = int(math.log2(generator.size)) * 2 - 2
        w_plus = torch.empty(batch, num_latent, generator.style_dim, dtype=dtype, requires_grad=backward)
        refinement = None
        if tokens.num_tokens:
            lead = () if tokens.shared else (batch,)
            convs, _ = generator.layers()
            ps = [torch.empty(*lead, tokens.num_tokens, spec.out_channel, dtype=dtype, requires_grad=backward) for spec in convs]
            qs = [torch.empty(*lead, tokens.num_tokens, spec.in_channel, dtype=dtype, requires_grad=backward) for spec in convs]
            refinement = Refinement(ps, qs, model.num_layers)
        grad_image = torch.empty(batch, 3, generator.size, generator.size, dtype=dtype)
    return model, w_plus, refinement, grad_image


def planned_generator_memory(
    generator: GeneratorConfig,
    batch: int,
    dtype: torch.dtype,
    tokens: TokenSetting,
    implementation: Implementation,
    backward: bool = True,
) -> dict[str, int]:
    """The memory one training step of the synthesis network allocates, planned on meta tensors.

    generator: the network (rosinality's Generator arguments); batch: B; dtype: every tensor's
    dtype (weights included); tokens: L per refined layer (0: unrefined), per sample or shared;
    implementation: which op the layers run (on meta tensors the Triton backend allocates
    what it would and launches nothing). The step is the benchmark's forward+backward: w+ [B, n_latent,
    style_dim] and the tokens need gradients, the weights are frozen, the stored noise is used;
    backward=False plans the forward alone, without gradients (the suite's forward cases).
    Returns {"after_forward_bytes": what the forward left alive (output and saved tensors),
    "peak_bytes": the most alive at once}, both over what existed before (weights, inputs).
    """
    model, w_plus, refinement, grad_image = meta_training_step(
        generator, batch, dtype, tokens, implementation.backend, backward
    )
    with patched_op(implementation.op), LiveBytes() as live:
        image = model.synthesis(w_plus, refinement=refinement, randomize_noise=False)
        after_forward = live.live_bytes
        if backward:
            image.backward(grad_image)
    return {"after_forward_bytes": after_forward, "peak_bytes": live.peak_bytes}


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose a planned step (shared with `benchmarks.traffic`). Defaults: the headline case."""
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--tokens", default="32", help="one setting as in --tokens of the suite, e.g. 0, 32, 256s")
    parser.add_argument("--impls", default="reference,nvlabs,torch,triton")


def parse_step_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(generator, dtype, token setting, implementations) from `add_step_arguments`' options;
    a bad value exits through parser.error with the option's name."""
    try:
        generator = GeneratorConfig(args.size)
        generator.layers()
        tokens = parse_tokens(args.tokens)
        implementations = select(args.impls.split(","))
    except ValueError as error:
        parser.error(str(error))
    if len(tokens) != 1:
        parser.error(f"--tokens: expected one setting, got {args.tokens!r}")
    return generator, getattr(torch, args.dtype), tokens[0], implementations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description="Planned peak memory of a synthesis-network training step, per implementation, "
        "from meta tensors (no GPU, no compute). Defaults: the headline case.",
    )
    add_step_arguments(parser)
    args = parser.parse_args(argv)
    generator, dtype, tokens, implementations = parse_step_arguments(parser, args)
    print(f"planned training-step memory, {generator.label}, B={args.batch}, {args.dtype}, {tokens.label} "
          "(meta tensors: whole storages, no allocator rounding or library workspaces)")
    plans = {}
    for implementation in implementations:
        plans[implementation.name] = planned_generator_memory(generator, args.batch, dtype, tokens, implementation)
    reference = plans.get("reference")
    for name, plan in plans.items():
        ratio = f"  {plan['peak_bytes'] / reference['peak_bytes']:.2f}x the reference" if reference else ""
        print(f"  {name:10s} after forward {plan['after_forward_bytes'] / 2**30:6.2f} GiB"
              f"  peak {plan['peak_bytes'] / 2**30:6.2f} GiB{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
