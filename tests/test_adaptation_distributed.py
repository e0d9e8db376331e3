"""Domain adaptation over several processes (torchrun, gloo on CPU): N processes take the steps one
process takes with the same batch; the one-shot style loss's random directions follow the seed."""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.adaptation import Adapter
from refinestyle.adaptation.swd import SWDStyleLoss
from refinestyle.adaptation.train import CHECKPOINT_NAME, adapt_oneshot, adapt_text
from refinestyle.distributed import (
    DistributedContext,
    StopOnSignal,
    average_gradients,
    batch_share,
    broadcast_from_main,
    mean_over_processes,
)
from refinestyle.generator import Generator
from two_processes import torchrun_two_processes

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return Generator(16, style_dim=16, n_mlp=2, channel_max=8).eval().requires_grad_(False)


class MirrorLoss(nn.Module):
    """A stand-in for the CLIP directional loss: a per-sample mean, so shares average to the batch's."""

    def forward(self, source, adapted):
        return ((adapted - source.flip(-1)) ** 2).mean()


class TinyFeatures(nn.Module):
    """Fixed random 3x3 features, as LPIPSFeatures gives them to the SWD style loss."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(5)))

    def forward(self, images):
        return [F.relu(F.conv2d(images.float(), self.weight))]


def one_shot_inputs(generator):
    rng = torch.Generator().manual_seed(9)
    reference = torch.rand(1, 3, 16, 16, generator=rng) * 2 - 1
    w_r = generator.style(torch.randn(1, 16, generator=rng))[:, None].repeat(1, generator.n_latent, 1)
    return reference, w_r


def run_both(work: Path, context=None, rank: int = 0) -> dict:
    """adapt_text (batch 4) and adapt_oneshot (batch 2) for 3 steps; each process's own token init."""
    generator = tiny_generator()
    torch.manual_seed(100 + rank)  # different on every process: rank 0's must win
    _, text_history = adapt_text(
        generator, MirrorLoss(), adapter=Adapter.for_generator(generator, num_tokens=4, scale_init=0.5),
        iterations=3, batch_size=4, lr=1e-2, work_dir=work / "text", checkpoint_every=2, sample_every=0,
        progress=False, distributed=context,
    )
    torch.manual_seed(200 + rank)
    reference, w_r = one_shot_inputs(generator)
    oneshot, oneshot_history = adapt_oneshot(
        generator, reference, w_r, nn.MSELoss(), SWDStyleLoss(TinyFeatures(), num_projections=16),
        adapter=Adapter.for_generator(generator, num_tokens=4, scale_init=0.5),
        iterations=3, batch_size=2, lr=1e-2, work_dir=work / "oneshot", checkpoint_every=0, sample_every=0,
        progress=False, distributed=context,
    )
    text_tokens = torch.load(work / "text" / CHECKPOINT_NAME, weights_only=False)["tokens"]
    return {
        "text_history": text_history, "oneshot_history": oneshot_history,
        "oneshot_tokens": {k: v.detach().clone() for k, v in oneshot.tokens.state_dict().items()},
        "text_checkpoint_tokens": text_tokens,
    }


SCRIPT = """
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_adaptation_distributed import run_both
from refinestyle.distributed import setup_distributed
context = setup_distributed("cpu")
result = run_both(Path({out!r}), context, context.rank)
torch.save(result, Path({out!r}) / f"rank{{context.rank}}.pt")
"""


def run_under_torchrun(script_text: str, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run script_text with `torchrun --nproc_per_node 2` (gloo on the CPU); returns the finished process."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(script_text))
    return torchrun_two_processes(script, timeout=timeout)


def test_two_processes_take_the_steps_of_one(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    completed = run_under_torchrun(SCRIPT.format(tests=str(REPO / "tests"), out=str(out)), tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = run_both(tmp_path / "single")

    # the processes agree exactly: rank 0's initial tokens, averaged gradients, the batch's losses
    assert rank0["text_history"] == rank1["text_history"]
    assert rank0["oneshot_history"] == rank1["oneshot_history"]
    assert all(torch.equal(rank0["oneshot_tokens"][k], rank1["oneshot_tokens"][k]) for k in rank0["oneshot_tokens"])
    # and they took the one-process run's steps (up to the order of the batch sums)
    for key in ("text_history", "oneshot_history"):
        assert len(rank0[key]) == len(single[key]) == 3
        for ours, theirs in zip(rank0[key], single[key]):
            assert ours.keys() == theirs.keys()
            assert all(ours[k] == pytest.approx(theirs[k], rel=1e-5, abs=1e-7) for k in ours)
    assert rank0["text_history"][-1]["loss"] < rank0["text_history"][0]["loss"]  # it trained
    for key in ("oneshot_tokens", "text_checkpoint_tokens"):
        for name, value in single[key].items():
            torch.testing.assert_close(rank0[key][name], value, rtol=1e-4, atol=1e-6)
    # only rank 0 wrote the run's files, once
    assert (out / "text" / CHECKPOINT_NAME).is_file() and (out / "text" / "loss.png").is_file()


SIGNAL_SCRIPT = """
import os, signal, sys, time, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_adaptation_distributed import MirrorLoss, tiny_generator
from refinestyle.adaptation.train import adapt_text
from refinestyle.distributed import TrainingInterrupted, setup_distributed

context = setup_distributed("cpu")
out = Path({out!r})
if context.rank == 0:  # a slow disk: rank 1 must not resume before rank 0 has written the checkpoint
    save = torch.save

    def slow_save(*args, **kwargs):
        time.sleep(1.0)
        return save(*args, **kwargs)

    torch.save = slow_save


class CtrlCOnRankOne(MirrorLoss):
    \"\"\"Ctrl-C reaches rank 1 alone, in the middle of step 1, twice (the terminal's, then torchrun's).\"\"\"

    calls = 0

    def forward(self, source, adapted):
        CtrlCOnRankOne.calls += 1
        if context.rank == 1 and CtrlCOnRankOne.calls == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return super().forward(source, adapted)


def run(work, loss, resume=False):
    adapter, history = adapt_text(tiny_generator(), loss, num_tokens=4, scale_init=0.5, iterations=4, batch_size=4,
                                  lr=1e-2, work_dir=work, checkpoint_every=0, sample_every=0, progress=False,
                                  distributed=context, resume=resume)
    return {{k: v.detach().clone() for k, v in adapter.tokens.state_dict().items()}}, history


straight, straight_history = run(out / "straight", MirrorLoss())
try:
    run(out / "stopped", CtrlCOnRankOne())
    stopped = None
except TrainingInterrupted as interrupt:
    stopped = (interrupt.signum, interrupt.step)
resumed, resumed_history = run(out / "stopped", MirrorLoss(), resume=True)
torch.save({{"stopped": stopped, "straight": straight, "resumed": resumed, "straight_history": straight_history,
            "resumed_history": resumed_history}}, out / f"rank{{context.rank}}.pt")
"""


def test_ctrl_c_on_one_process_stops_every_process_after_the_same_step(tmp_path):
    """Rank 1 alone gets Ctrl-C in step 1. Without the agreement it would raise there and leave rank 0
    waiting in the step's all-reduce (under NCCL, until torchrun kills the run and the steps since the
    last checkpoint are lost). Both processes finish step 1, the checkpoint holds 2 steps, and the
    resumed run ends with the uninterrupted run's tokens. Rank 0 writes slowly: rank 1 resumes in
    the same process, so it must not return before the checkpoint is on disk."""
    out = tmp_path / "signal"
    out.mkdir()
    completed = run_under_torchrun(SIGNAL_SCRIPT.format(tests=str(REPO / "tests"), out=str(out)), tmp_path,
                                   timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["stopped"] == rank1["stopped"] == (signal.SIGINT, 2)
    assert torch.load(out / "stopped" / CHECKPOINT_NAME, weights_only=False)["step"] == 4
    for rank in (rank0, rank1):
        assert [e["step"] for e in rank["resumed_history"]] == [1, 2, 3, 4]
        assert rank["resumed_history"] == rank["straight_history"]
        for name, value in rank["straight"].items():
            assert torch.equal(rank["resumed"][name], value), name


def test_stop_on_signal_counts_a_quick_repeat_once_and_raises_on_insistence():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread only")
    with StopOnSignal(insist_after=60) as stop:
        assert stop.vote() == {StopOnSignal.VOTE_KEY: 0.0}
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # within insist_after: the same request
        assert stop.requested and stop.signum == signal.SIGTERM
        values = {"loss": 1.0, **stop.vote()}
        assert stop.agreed(values) and values == {"loss": 1.0}
        assert (stop.interrupted(7).signum, stop.interrupted(7).step) == (signal.SIGTERM, 7)
        with pytest.raises(KeyError, match="average vote"):
            stop.agreed({"loss": 1.0})
    with pytest.raises(KeyboardInterrupt):
        with StopOnSignal(insist_after=0) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)  # the user insists: at once, as without the context
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # a process told by the vote, not by a signal, stops as on Ctrl-C
    with StopOnSignal() as stop:
        assert stop.agreed({StopOnSignal.VOTE_KEY: 0.5}) and stop.signum == signal.SIGINT
        assert not StopOnSignal().agreed({StopOnSignal.VOTE_KEY: 0.0})
    with pytest.raises(ValueError, match="insist_after"):
        StopOnSignal(insist_after=-1)


def test_stop_on_signal_leaves_the_handlers_alone_outside_the_main_thread():
    seen = []
    worker = threading.Thread(target=lambda: seen.append(StopOnSignal().__enter__()._previous))
    worker.start()
    worker.join()
    assert seen == [{}]


def test_one_shot_resume_draws_the_same_style_directions(tmp_path):
    """The SWD's random directions come from the step's seeded generator, not the global RNG: a run
    resumed in a fresh process (the global RNG restarted) takes the uninterrupted run's steps."""
    generator = tiny_generator()
    reference, w_r = one_shot_inputs(generator)

    def run(work, iterations, resume=False):
        torch.manual_seed(3)
        adapter = Adapter.for_generator(generator, num_tokens=4, scale_init=0.5)
        torch.manual_seed(4)  # what a new process would start from
        adapter, history = adapt_oneshot(
            generator, reference, w_r, nn.MSELoss(), SWDStyleLoss(TinyFeatures(), num_projections=8),
            adapter=adapter, iterations=iterations, batch_size=2, lr=1e-2, work_dir=work, checkpoint_every=0,
            sample_every=0, progress=False, resume=resume,
        )
        return adapter, history

    straight, straight_history = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, resumed_history = run(tmp_path / "b", 4, resume=True)
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in straight_history]
    for name, value in straight.tokens.state_dict().items():
        assert torch.equal(resumed.tokens.state_dict()[name], value), name


def test_the_collectives_are_no_ops_in_one_process_and_shares_must_be_even():
    parameter = nn.Parameter(torch.ones(3))
    parameter.grad = torch.full((3,), 2.0)
    average_gradients([parameter], None)
    broadcast_from_main([parameter], DistributedContext())
    assert torch.equal(parameter.grad, torch.full((3,), 2.0)) and torch.equal(parameter, torch.ones(3))
    assert mean_over_processes({"a": torch.tensor(1.5), "b": 2}, None) == {"a": 1.5, "b": 2.0}
    assert batch_share(4, None) == slice(0, 4)
    assert batch_share(6, DistributedContext(rank=2, world_size=3)) == slice(4, 6)
    with pytest.raises(ValueError, match="batch_size: 3 codes per step do not split evenly over 2 processes"):
        batch_share(3, DistributedContext(rank=1, world_size=2))
    generator = tiny_generator()
    with pytest.raises(ValueError, match="this process's device is meta"):
        adapt_text(generator, MirrorLoss(), num_tokens=2, iterations=1, batch_size=2, progress=False,
                   distributed=DistributedContext(rank=0, world_size=2, device=torch.device("meta")))
    with pytest.raises(ValueError, match="multiple of 2"):
        adapt_text(generator, MirrorLoss(), num_tokens=2, iterations=1, batch_size=3, progress=False,
                   distributed=DistributedContext(rank=0, world_size=2))


def test_fresh_tokens_come_from_the_seed_and_no_step_stream():
    """The same seed gives the same tokens whatever the global RNG holds; they are not step 0's draws,
    and the global RNG is left as it was."""
    generator = tiny_generator()
    tokens = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        adapter, _ = adapt_text(generator, MirrorLoss(), num_tokens=2, iterations=0, progress=False, seed=0)
        assert torch.equal(torch.get_rng_state(), before)
        tokens.append(adapter.tokens.layers[0].P.detach().clone())
    assert torch.equal(tokens[0], tokens[1])
    step_zero = torch.randn(tokens[0].numel(), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(tokens[0].flatten(), step_zero)
    other, _ = adapt_text(generator, MirrorLoss(), num_tokens=2, iterations=0, progress=False, seed=1)
    assert not torch.equal(other.tokens.layers[0].P, tokens[0])
