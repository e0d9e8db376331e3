"""One process or many (torchrun): where this process sits, and the few collectives training needs.

Both trainers (`refinestyle.inversion.train`, `refinestyle.adaptation.train`) run
unchanged under `torchrun --nproc_per_node N`: `setup_distributed` reads torchrun's
environment (WORLD_SIZE, RANK, LOCAL_RANK) and initialises the process group (nccl on
GPUs, gloo on CPU); without it, the context is a single process and every helper here
is a no-op.

The process group lives as long as the process: a second training run in the same
process reuses it, and it is destroyed at exit. (Destroying it after a run and
initialising it again deadlocks under torchrun: the new group rendezvouses through the
launcher's store under the same keys as the old one and reads the old group's stale
addresses.)
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "setup_distributed", "batch_share", "mean_over_processes",
           "average_gradients", "broadcast_from_main", "StopOnSignal", "TrainingInterrupted"]


@dataclass
class DistributedContext:
    """Where this process sits: rank, world size, its device. world_size 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_distributed(device: str | None = None) -> DistributedContext:
    """Initialise torch.distributed from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK).

    device: "cpu", "cuda", "cuda:N" or None (cuda when available). Under torchrun with
    CUDA, each process takes cuda:LOCAL_RANK. Uses nccl when CUDA is used, else gloo.
    Without torchrun's variables (a plain `python` run) this returns a single-process context.
    Under torchrun the process group is initialised on the first call only; later calls
    (a second run in the same process) reuse it, and it is destroyed when the process exits.
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
        atexit.register(_destroy_process_group)
    return context


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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


class TrainingInterrupted(KeyboardInterrupt):
    """A training run stopped on SIGINT or SIGTERM after finishing a step and writing its checkpoint.

    A KeyboardInterrupt, so code that handles Ctrl-C handles it. `signum` is the signal that
    asked for the stop, `step` the number of steps the checkpoint holds; the commands exit
    with 128 + signum (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}")
        self.signum = signum
        self.step = step


class SignalInterrupt(KeyboardInterrupt):
    """SIGINT or SIGTERM during work that has no step to finish (`interrupt_on_signals`); `signum`
    is the signal, for the exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interrupt_on_signals():
    """Inside, SIGINT and SIGTERM raise SignalInterrupt at once: for preparation before a training
    loop (a projection of the reference), which SIGTERM would otherwise end without a word.
    Outside the main thread, where Python cannot handle signals, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise SignalInterrupt(signum)

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopOnSignal:
    """SIGINT and SIGTERM ask a training loop to stop after its current step, on every process at once.

    Under torchrun, Ctrl-C reaches every process (from the terminal, and again from torchrun's
    agent, which also forwards SIGTERM, as a cluster's scheduler sends it before preempting a
    job). A process that raised KeyboardInterrupt in the middle of a step would leave the others
    waiting in a collective, and the steps since the last checkpoint would be lost. Inside this
    context the signal handler only records the signal. Once per step, the loop adds `vote()` to
    the values it already averages over the processes (no extra collective) and reads the
    outcome with `agreed(values)`, which is the same on every process; every process then
    finishes that step, the run writes its checkpoint and raises `interrupted(step)`.

    Another signal more than `insist_after` seconds after the first (the user pressing Ctrl-C
    again) raises KeyboardInterrupt at once, as Python would have. A signal repeated sooner
    counts as the same request: torchrun's agent forwards the terminal's Ctrl-C right after it.
    Outside the main thread, where Python cannot handle signals, the context does nothing.
    """

    VOTE_KEY = "__stop_requested__"
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, insist_after: float = 2.0):
        if not insist_after >= 0:
            raise ValueError(f"insist_after: expected seconds >= 0, got {insist_after!r}")
        self.insist_after = insist_after
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._deferring = False
        self._insisted = False

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif now - self._first_at > self.insist_after:
            if self._deferring:
                self._insisted = True  # raised when the deferred section ends
            else:
                raise KeyboardInterrupt
        # the request is now known on this process; the others learn it at the next vote

    @contextlib.contextmanager
    def deferred(self):
        """A section an insisting signal does not cut in two: its KeyboardInterrupt is raised
        when the section ends. For an update and its bookkeeping (the optimizer's step and the
        count of steps done), so that a checkpoint written on that KeyboardInterrupt holds
        what its step count says."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._insisted:
            self._insisted = False
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        """Whether this process received a signal (the others may not know yet)."""
        return self.signum is not None

    def vote(self) -> dict[str, float]:
        """{VOTE_KEY: 1.0 or 0.0}: merge into the values the step averages with mean_over_processes."""
        return {self.VOTE_KEY: float(self.requested)}

    def agreed(self, values: dict[str, float]) -> bool:
        """Remove the vote from the averaged `values`; True when any process asked to stop.

        Every process gets the same answer from the same averaged values, so all of them stop
        after the same step. A process that did not receive the signal itself stops as if it had
        received SIGINT.
        """
        if self.VOTE_KEY not in values:
            raise KeyError(f"values: no {self.VOTE_KEY!r}; average vote() with the step's values first")
        stop = values.pop(self.VOTE_KEY) > 0
        if stop and self.signum is None:
            self.signum = signal.SIGINT
        return stop

    def interrupted(self, step: int) -> TrainingInterrupted:
        """The exception to raise once the checkpoint after `step` steps is written."""
        return TrainingInterrupted(self.signum if self.signum is not None else signal.SIGINT, step)
