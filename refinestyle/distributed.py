"""One process or many (torchrun): where this process sits, and the few collectives training needs.

Both trainers (`refinestyle.inversion.train`, `refinestyle.adaptation.train`) run
unchanged under `torchrun --nproc_per_node N`: `setup_distributed` reads torchrun's
environment (WORLD_SIZE, RANK, LOCAL_RANK) and initialises the process group (nccl on
GPUs, gloo on CPU); without it, the context is a single process and every helper here
is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "setup_distributed", "batch_share", "mean_over_processes",
           "average_gradients", "broadcast_from_main"]


@dataclass
class DistributedContext:
    """Where this process sits: rank, world size, its device. world_size 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str | None = None) -> DistributedContext:
    """Initialise torch.distributed from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK).

    device: "cpu", "cuda", "cuda:N" or None (cuda when available). Under torchrun with
    CUDA, each process takes cuda:LOCAL_RANK. Uses nccl when CUDA is used, else gloo.
    Without torchrun's variables (a plain `python` run) this returns a single-process context.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for, but no CUDA device is available")
    want_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if want_cuda:
        target = torch.device(device) if device not in (None, "cuda") else torch.device("cuda", local_rank)
        if world_size > 1:
            target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    else:
        target = torch.device(device or "cpu")
    context = DistributedContext(rank, world_size, local_rank, target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
        context.initialized_here = True
    return context


def batch_share(batch_size: int, context: DistributedContext | None) -> slice:
    """The rows of a global batch of `batch_size` that this process computes.

    Every process draws the whole batch from the same seeded generator and keeps its
    share, so N processes compute exactly the samples one process would, and averaging
    their gradients gives the one-process gradient of a per-sample mean loss.
    Raises ValueError unless batch_size is a multiple of the world size.
    """
    if context is None or not context.distributed:
        return slice(0, batch_size)
    if batch_size % context.world_size:
        raise ValueError(
            f"batch_size: {batch_size} codes per step do not split evenly over {context.world_size} processes; "
            f"use a multiple of {context.world_size}"
        )
    share = batch_size // context.world_size
    return slice(context.rank * share, (context.rank + 1) * share)


def mean_over_processes(values: Mapping[str, float | torch.Tensor], context: DistributedContext | None,
                        device: torch.device | None = None) -> dict[str, float]:
    """{name: scalar} averaged over the processes, as Python floats (every process gets the same dict).

    values: the same keys on every process; scalars as floats or one-element tensors.
    device: where the values are gathered and reduced (default: the context's device).
    """
    keys = list(values)
    if not keys:
        return {}
    if device is None:
        tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
        device = context.device if context is not None else tensors[0].device if tensors else torch.device("cpu")
    # one stack and one copy back to the host, however many terms
    stacked = torch.stack(
        [torch.as_tensor(values[k], dtype=torch.float32, device=device).detach().reshape(()) for k in keys]
    )
    if context is not None and context.distributed:
        dist.all_reduce(stacked)
        stacked /= context.world_size
    return dict(zip(keys, stacked.tolist()))


def average_gradients(parameters: Iterable[torch.nn.Parameter], context: DistributedContext | None) -> None:
    """Replace every parameter's .grad by its mean over the processes (in one flat all-reduce).

    A parameter without a gradient counts as a zero gradient, so every process joins the
    same collective whatever its loss touched (a parameter no process's loss touched then
    gets a zero gradient, which Adam still moves by its momentum where one process would
    have skipped it; the trainers here touch every token at every step).
    """
    if context is None or not context.distributed:
        return
    parameters = list(parameters)
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    flat /= context.world_size
    offset = 0
    for parameter in parameters:
        count = parameter.numel()
        parameter.grad.copy_(flat[offset : offset + count].view_as(parameter.grad))
        offset += count


def broadcast_from_main(tensors: Iterable[torch.Tensor], context: DistributedContext | None) -> None:
    """Overwrite each tensor, in place, with rank 0's values (initial weights, a shared w_r)."""
    if context is None or not context.distributed:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)
