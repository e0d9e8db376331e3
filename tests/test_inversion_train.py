"""Training the inverters on CPU with tiny models: loss goes down, tokens beat w+ alone on
out-of-domain images, resume is bit-for-bit, DDP over 2 gloo processes agrees."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from inversion_fixtures import (
    TINY_MODEL_OPTIONS,
    planted_refinement,
    tiny_generator,
    tiny_train_config,
    write_generator,
    write_images,
)
from refinestyle.distributed import TrainingInterrupted
from refinestyle.inversion.data import ImageFolderDataset
from refinestyle.inversion.train import build_inverter, load_frozen_generator, train_inverter, trainable_state_dict
from kernel_cases import record_launches
from two_processes import torchrun_two_processes

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny generator file and 4 images it renders with a planted low-rank kernel residual."""
    root = tmp_path_factory.mktemp("planted")
    generator = tiny_generator()
    path = write_generator(generator, root / "generator.pt")
    write_images(generator, root / "data", 4, refinement=planted_refinement(generator))
    return path, root / "data"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _mse(model, folder: Path) -> float:
    dataset = ImageFolderDataset(folder, 32)
    images = torch.stack([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return (model.eval()(images).image - images).pow(2).mean().item()


def test_one_stage_steps_lower_the_loss(planted, tmp_path):
    generator_path, data = planted
    summary = train_inverter(tiny_train_config(generator_path, data, tmp_path / "run", max_steps=6))
    assert summary.step == 6
    assert summary.last_losses["total"] < 0.8 * summary.first_losses["total"], (summary.first_losses, summary.last_losses)
    rows = _read_csv(tmp_path / "run" / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert {"l2", "lpips", "total", "lr"} <= set(rows[0])
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").is_file()
    assert (tmp_path / "run" / "inverter.safetensors").is_file()


def test_token_branch_beats_w_plus_alone_on_planted_residuals(planted, tmp_path):
    """Out of domain: the images carry a kernel residual that no w+ code can produce.

    After the same short training, the one-stage model with the token branch reconstructs
    them clearly better than the same model without it (w+ only). A two-stage model on top
    of the w+-only model keeps its w0+ and learns tokens: its refined reconstructions beat
    w0+ alone. The numbers are printed (pytest -s).
    """
    generator_path, data = planted
    options = {**TINY_MODEL_OPTIONS, "scale_init": 0.1}  # a short run: start the residuals less close to 0
    common = dict(lpips_weight=0.0, lr=3e-3, max_steps=100, model_options=options)
    w_plus_only = train_inverter(tiny_train_config(generator_path, data, tmp_path / "first", refine=False, **common))
    one_stage = train_inverter(tiny_train_config(generator_path, data, tmp_path / "one", **common))
    w_plus_only_mse, one_stage_mse = _mse(w_plus_only.model, data), _mse(one_stage.model, data)

    two = train_inverter(
        tiny_train_config(generator_path, data, tmp_path / "two", stage="two", first_stage=w_plus_only.inverter,
                          lpips_weight=0.0, lr=1e-2, max_steps=40, model_options=options)
    )
    dataset = ImageFolderDataset(data, 32)
    images = torch.stack([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        result = two.model.eval()(images)
    refined_mse = (result.image - images).pow(2).mean().item()
    initial_mse = (result.initial_image - images).pow(2).mean().item()
    print(
        f"\nplanted residuals, reconstruction MSE after 100 steps: one-stage w+ only {w_plus_only_mse:.5f}, "
        f"one-stage with tokens {one_stage_mse:.5f}; two-stage (+40 steps) w0+ alone {initial_mse:.5f}, "
        f"with tokens {refined_mse:.5f}"
    )
    assert one_stage_mse < 0.85 * w_plus_only_mse
    assert initial_mse == pytest.approx(w_plus_only_mse, rel=1e-4)  # the frozen first stage is reused as is
    assert two.last_losses["total"] < two.first_losses["total"]
    assert refined_mse < 0.85 * initial_mse


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_compiled_generator_trains_as_the_eager_one(planted, tmp_path, monkeypatch, grad_checkpointing):
    """config.compile runs the generator's synthesis through torch.compile (Dynamo captures its
    graphs, with or without gradient checkpointing around the layers) and the run logs the same
    losses as the eager one. torch.compile is pinned to the "aot_eager" backend: Inductor's
    C++ build of even this tiny network takes most of a minute on two cores."""
    from torch._dynamo.utils import counters

    generator_path, data = planted
    common = dict(max_steps=3, lr=3e-3, grad_checkpointing=grad_checkpointing)
    eager = train_inverter(tiny_train_config(generator_path, data, tmp_path / "eager", **common))
    assert not eager.model.generator.synthesis_is_compiled
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    counters.clear()
    compiled = train_inverter(tiny_train_config(generator_path, data, tmp_path / "compiled", compile="default", **common))
    assert compiled.model.generator.synthesis_is_compiled and counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
    assert compiled.last_losses.keys() == eager.last_losses.keys()
    for name, value in eager.last_losses.items():
        assert compiled.last_losses[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] == "default"


def test_resume_continues_bit_for_bit(planted, tmp_path):
    generator_path, data = planted
    # 5 images, batch 2: 2 batches per epoch, so step 3 stops in the middle of epoch 1.
    folder = tmp_path / "data"
    write_images(tiny_generator(), folder, 5, seed=7)
    # dropout draws from the global RNG in every step, so a resume must restore its state too
    common = dict(batch_size=2, hflip=True, checkpoint_every=3, image_every=3, lr=3e-3,
                  model_options={**TINY_MODEL_OPTIONS, "dropout": 0.1})  # fmt: skip
    straight = train_inverter(tiny_train_config(generator_path, folder, tmp_path / "a", max_steps=5, **common))
    train_inverter(tiny_train_config(generator_path, folder, tmp_path / "b", max_steps=3, **common))
    with pytest.raises(FileExistsError):
        train_inverter(tiny_train_config(generator_path, folder, tmp_path / "b", max_steps=5, **common))
    resumed = train_inverter(tiny_train_config(generator_path, folder, tmp_path / "b", max_steps=5, resume=True, **common))
    assert resumed.steps_this_run == 2
    assert resumed.last_losses == straight.last_losses
    rows_a = [{k: v for k, v in r.items() if k != "seconds"} for r in _read_csv(tmp_path / "a" / "train_log.csv")]
    rows_b = [{k: v for k, v in r.items() if k != "seconds"} for r in _read_csv(tmp_path / "b" / "train_log.csv")]
    assert rows_a == rows_b and len(rows_a) == 5
    state_a, state_b = trainable_state_dict(straight.model), trainable_state_dict(resumed.model)
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    saved_a = torch.load(tmp_path / "a" / "checkpoints" / "latest.pt", weights_only=False)
    saved_b = torch.load(tmp_path / "b" / "checkpoints" / "latest.pt", weights_only=False)
    assert (saved_a["step"], saved_a["epoch"], saved_a["batch_in_epoch"]) == (5, 2, 1)
    assert (saved_b["step"], saved_b["epoch"], saved_b["batch_in_epoch"]) == (5, 2, 1)
    exp_avg_a = [s["exp_avg"] for s in saved_a["optimizer"]["state"].values() if "exp_avg" in s]
    exp_avg_b = [s["exp_avg"] for s in saved_b["optimizer"]["state"].values() if "exp_avg" in s]
    assert exp_avg_a and all(torch.equal(x, y) for x, y in zip(exp_avg_a, exp_avg_b))
    assert sorted(p.name for p in (tmp_path / "b" / "images").iterdir()) == ["step_0000003.png", "step_0000005.png"]


@pytest.mark.parametrize("field, value, expected", [
    ("log_every", 0, "log_every: expected a positive integer, got 0"),
    ("val_max_images", 0, "val_max_images: expected a positive integer, got 0"),
    ("checkpoint_every", -1, "checkpoint_every: expected an integer >= 0 (0: none), got -1"),
    ("image_every", -1, "image_every: expected an integer >= 0 (0: none), got -1"),
    ("val_every", -1, "val_every: expected an integer >= 0 (0: none), got -1"),
    ("workers", -1, "workers: expected an integer >= 0, got -1"),
    ("seed", 2**32, "seed: expected an integer in [0, 2**32 - 1], got 4294967296"),
    ("model_options", {"heads": 2, "foo": 1}, "model_options (--model-option): unknown 'foo'; the one-stage inverter "
                                              "takes dropout, encoder_depth, encoder_size, encoder_widths, ffn_dim, "
                                              "head_dim, heads, scale_init, token_levels, train_mapping"),
])  # fmt: skip
def test_train_config_refuses_meaningless_values(planted, tmp_path, field, value, expected):
    """log_every 0 was a ZeroDivisionError at the first step, an unknown model option a TypeError."""
    generator_path, data = planted
    with pytest.raises(ValueError, match=re.escape(expected)):
        tiny_train_config(generator_path, data, tmp_path / "run", **{field: value})


def test_gradient_checkpointing_gives_the_same_training(planted, tmp_path):
    generator_path, data = planted
    plain = train_inverter(tiny_train_config(generator_path, data, tmp_path / "plain", max_steps=2))
    checkpointed = train_inverter(
        tiny_train_config(generator_path, data, tmp_path / "ckpt", max_steps=2, grad_checkpointing=True)
    )
    assert checkpointed.model.generator.conv1.forward.__name__ == "run"  # the layers really are wrapped
    a, b = trainable_state_dict(plain.model), trainable_state_dict(checkpointed.model)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert checkpointed.last_losses["total"] == pytest.approx(plain.last_losses["total"], rel=1e-4)


def test_bf16_autocast_trains(planted, tmp_path):
    generator_path, data = planted
    summary = train_inverter(tiny_train_config(generator_path, data, tmp_path / "bf16", max_steps=3, bf16=True))
    assert all(torch.isfinite(torch.tensor(v)) for v in summary.last_losses.values())
    assert summary.last_losses["total"] < summary.first_losses["total"]


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from inversion_fixtures import tiny_train_config
from refinestyle.inversion.train import build_inverter, load_frozen_generator, train_inverter, trainable_state_dict
from pathlib import Path
config = tiny_train_config(Path({generator!r}), Path({data!r}), Path({out!r}), max_steps=3, batch_size=2,
                           checkpoint_every=2, val_data={data!r}, val_every=3)
summary = train_inverter(config)
rank = int(os.environ["RANK"])
parameters = {{n: p.detach() for n, p in summary.model.named_parameters() if p.requires_grad}}
torch.save({{"state": trainable_state_dict(summary.model), "parameters": parameters, "losses": summary.last_losses,
            "validation": summary.validation}}, Path({out!r}) / f"rank{{rank}}.pt")
"""


def test_ddp_two_gloo_processes(planted, tmp_path):
    generator_path, data = planted
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(
        tests=str(REPO / "tests"), generator=str(generator_path), data=str(data), out=str(out))))
    completed = torchrun_two_processes(script, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rank0 = torch.load(out / "rank0.pt", weights_only=False)
    rank1 = torch.load(out / "rank1.pt", weights_only=False)
    # DDP keeps the replicas' weights identical although each rank read other images
    # (BatchNorm running statistics are per rank; the checkpoint holds rank 0's), and both
    # ranks log the all-reduced losses.
    assert rank0["parameters"].keys() == rank1["parameters"].keys()
    assert all(torch.equal(rank0["parameters"][k], rank1["parameters"][k]) for k in rank0["parameters"])
    assert rank0["losses"] == rank1["losses"]
    # rank 0 validates; every rank's summary holds its metrics
    assert rank0["validation"] and rank1["validation"] == rank0["validation"]
    checkpoint = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2
    # 4 images over 2 ranks, batch 2: one step per epoch, each rank its own half.
    assert checkpoint["epoch"] == 3 and checkpoint["batch_in_epoch"] == 0
    # The run's initial weights: the same seed and construction order as train_inverter.
    torch.manual_seed(0)
    config = tiny_train_config(generator_path, data, out)
    initial = trainable_state_dict(build_inverter(config, load_frozen_generator(str(generator_path), "cpu"), "cpu"))
    assert initial.keys() == rank0["state"].keys()
    changed = [k for k in initial if not torch.equal(rank0["state"][k], initial[k])]
    assert len(changed) > len(initial) // 2, "DDP training left most weights unchanged"


TWO_RUNS_SCRIPT = """
import os, sys, time
sys.path.insert(0, {tests!r})
from inversion_fixtures import tiny_train_config
from refinestyle.inversion.train import train_inverter
from pathlib import Path
out = Path({out!r})
rank = os.environ["RANK"]
for run in ("first", "second"):
    train_inverter(tiny_train_config(Path({generator!r}), Path({data!r}), out / run, max_steps=1, batch_size=2))
    (out / f"{{run}}{{rank}}.done").touch()
    if rank == "1":
        time.sleep(2)  # rank 0 starts the second run first: it then read rank 1's stale address
"""


def test_a_second_run_in_the_same_torchrun_process(planted, tmp_path):
    """Two runs in one process (a notebook, a sweep) share the process group. (Destroying it after
    the first run and initialising it again hung in the rendezvous: the launcher's store still
    held the old group's addresses under the same keys.)"""
    generator_path, data = planted
    out = tmp_path / "two"
    script = tmp_path / "two_runs.py"
    script.write_text(textwrap.dedent(TWO_RUNS_SCRIPT.format(
        tests=str(REPO / "tests"), generator=str(generator_path), data=str(data), out=str(out))))
    try:
        completed = torchrun_two_processes(script, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung; finished: {sorted(p.name for p in out.glob('*.done'))}")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.done")) == ["first0.done", "first1.done", "second0.done", "second1.done"]


SIGNAL_SCRIPT = """
import os, signal, sys, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
sys.path.insert(0, {tests!r})
from inversion_fixtures import tiny_train_config
from refinestyle.distributed import TrainingInterrupted
from refinestyle.inversion.train import train_inverter, trainable_state_dict
from pathlib import Path
rank = int(os.environ["RANK"])
out = Path({out!r})
phase = sys.argv[1]
config = tiny_train_config(Path({generator!r}), Path({data!r}), out / ("straight" if phase == "straight" else "stopped"),
                           max_steps=4, batch_size=2, checkpoint_every=0, workers=1, resume=phase == "resume")
steps = 0


def sigterm_on_rank_one(optimizer, args, kwargs):
    # SIGTERM reaches rank 1 alone, after its first step: the step-2 vote tells rank 0
    global steps
    steps += 1
    if rank == 1 and steps == 1:
        os.kill(os.getpid(), signal.SIGTERM)


result = {{}}
if phase == "stop":
    register_optimizer_step_post_hook(sigterm_on_rank_one)
    try:
        train_inverter(config)
    except TrainingInterrupted as interrupt:
        result["stopped"] = (interrupt.signum, interrupt.step)
    result["saved_step"] = torch.load(out / "stopped" / "checkpoints" / "latest.pt", weights_only=False)["step"]
else:
    summary = train_inverter(config)
    result.update(state=trainable_state_dict(summary.model), losses=summary.last_losses,
                  steps=summary.steps_this_run)
torch.save(result, out / f"{{phase}}{{rank}}.pt")
"""


def test_sigterm_on_one_ddp_process_stops_both_after_the_same_step(planted, tmp_path):
    """A scheduler's SIGTERM (or Ctrl-C) reaching one process only: both finish the step, the
    checkpoint keeps it, and --resume ends bit for bit where the uninterrupted run ends. (Each
    phase is a torchrun launch of its own, as a resumed job is.)"""
    generator_path, data = planted
    out = tmp_path / "signal"
    script = tmp_path / "signal_train.py"
    script.write_text(textwrap.dedent(SIGNAL_SCRIPT.format(
        tests=str(REPO / "tests"), generator=str(generator_path), data=str(data), out=str(out))))
    for phase in ("stop", "resume", "straight"):
        completed = torchrun_two_processes(script, phase, timeout=180)
        assert completed.returncode == 0, phase + completed.stdout[-3000:] + completed.stderr[-3000:]
    for rank in (0, 1):
        stopped, resumed, straight = (torch.load(out / f"{phase}{rank}.pt", weights_only=False)
                                      for phase in ("stop", "resume", "straight"))
        assert stopped["stopped"] == (signal.SIGTERM if rank == 1 else signal.SIGINT, 2)
        assert stopped["saved_step"] == 2 and resumed["steps"] == 2 and straight["steps"] == 4
        assert resumed["losses"] == straight["losses"]
        assert all(torch.equal(resumed["state"][k], straight["state"][k]) for k in straight["state"])


GROUP_SIGTERM_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from inversion_fixtures import tiny_train_config
from refinestyle.distributed import TrainingInterrupted
from refinestyle.inversion.train import train_inverter
from pathlib import Path
out = Path({out!r})
config = tiny_train_config(Path({generator!r}), Path({data!r}), out, max_steps=100_000, batch_size=2,
                           checkpoint_every=0, image_every=0, val_every=0, workers=2)
try:
    train_inverter(config)
except TrainingInterrupted as interrupt:
    print("stopped", interrupt.signum, interrupt.step)
print("saved", torch.load(out / "checkpoints" / "latest.pt", weights_only=False)["step"])
"""


def test_sigterm_to_the_process_group_stops_after_the_step_with_data_workers(planted, tmp_path):
    """A scheduler's SIGTERM (torchrun, Slurm, `kill -- -PGID`) reaches the data-loader workers
    too: they keep serving, as they do for Ctrl-C, so the trainer finishes its step and writes
    the checkpoint. (PyTorch's default let the workers die, and its SIGCHLD handler then failed
    the run with "DataLoader worker is killed by signal" and no checkpoint.)"""
    from refinestyle.inversion.train import _ignore_interrupts

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:  # what each worker runs first; the run below shows it end to end (where timing lets it)
        _ignore_interrupts(0)
        assert all(signal.getsignal(signum) == signal.SIG_IGN for signum in previous)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    generator_path, data = planted
    script, out = tmp_path / "group_sigterm.py", tmp_path / "run"
    script.write_text(textwrap.dedent(GROUP_SIGTERM_SCRIPT.format(
        tests=str(REPO / "tests"), generator=str(generator_path), data=str(data), out=str(out))))
    # its own session, so that the group signal reaches the trainer and its workers, not pytest
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        log = out / "train_log.csv"
        while not (log.is_file() and len(log.read_text().splitlines()) > 3):  # a few steps in, workers serving
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stdout + stderr[-3000:]
    stopped = re.search(r"stopped (\d+) (\d+)", stdout)
    assert stopped and int(stopped.group(1)) == signal.SIGTERM, stdout + stderr[-3000:]
    assert f"saved {stopped.group(2)}" in stdout


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.tensor(index)


def test_data_workers_forked_while_a_group_signal_arrives_keep_serving():
    """Workers are forked with SIGINT and SIGTERM held, and ignore both before letting them
    through: a SIGTERM that reaches a worker as it starts (before PyTorch's and then our
    handler are set) is dropped, and the worker serves its batches."""
    import multiprocessing

    from refinestyle.inversion.train import _ignore_interrupts, _interrupts_held

    before = set(multiprocessing.active_children())
    loader = torch.utils.data.DataLoader(_Numbers(), batch_size=2, num_workers=2, worker_init_fn=_ignore_interrupts)
    with _interrupts_held():
        batches = iter(loader)
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == 2
        for worker in workers:  # at once, while each is still starting
            os.kill(worker.pid, signal.SIGTERM)
    assert torch.cat(list(batches)).tolist() == list(range(8))


def test_a_stopping_loop_shuts_its_data_workers_down_although_its_frame_lives_on():
    """Our workers ignore SIGTERM, and multiprocessing stops daemon workers at the interpreter's
    exit with SIGTERM and waits for them: workers that outlive the loop would hang the exit.
    A stopping run's exception keeps the training frame alive in its traceback (here: kept)."""
    import multiprocessing

    from refinestyle.inversion.train import _batches, _ignore_interrupts

    def train_until_stopped():
        loader = torch.utils.data.DataLoader(_Numbers(), batch_size=2, num_workers=2,
                                             worker_init_fn=_ignore_interrupts)
        for batch in _batches(loader):
            assert len(set(multiprocessing.active_children()) - before) == 2
            raise TrainingInterrupted(signal.SIGTERM, 1)

    before = set(multiprocessing.active_children())
    try:
        train_until_stopped()
    except TrainingInterrupted as interrupt:
        kept = interrupt  # the traceback, and the frame, stay alive
        assert set(multiprocessing.active_children()) - before == set()
    assert kept.__traceback__ is not None


def test_the_command_reports_an_interrupted_run(monkeypatch, tmp_path, capsys):
    import refinestyle.inversion.train as train_module
    from refinestyle.cli import main

    def stopped(config):
        raise TrainingInterrupted(signal.SIGTERM, 12)

    monkeypatch.setattr(train_module, "train_inverter", stopped)
    status = main(["train-inverter", "--generator", "G.pt", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                   "--device", "cpu"])
    assert status == 143
    assert f"holds the run up to step 12; continue with refinestyle train-inverter --out {tmp_path / 'run'} --resume" \
        in capsys.readouterr().err


def test_training_through_the_fused_triton_kernels_matches_torch(planted, tmp_path, monkeypatch):
    """Forward and backward of the generator through the Triton kernels (the interpreter on CPU)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1 (set by conftest.py)")
    generator_path, data = planted
    runs = {}
    launches = record_launches(monkeypatch)
    for backend in ("triton", "torch"):
        runs[backend] = train_inverter(
            tiny_train_config(generator_path, data, tmp_path / backend, batch_size=1, max_steps=2, backend=backend)
        )
        assert backend != "triton" or {"conv_gemm[mode 0]", "conv_gemm[mode 1]"} <= set(launches)
    triton_run, torch_run = runs["triton"], runs["torch"]
    assert triton_run.last_losses["total"] != triton_run.first_losses["total"]  # step 1 changed the weights
    assert triton_run.last_losses["total"] == pytest.approx(torch_run.last_losses["total"], rel=1e-4)
    a, b = trainable_state_dict(triton_run.model), trainable_state_dict(torch_run.model)
    # An attention key bias shifts every logit of a query's row alike, so its true gradient is
    # zero and Ranger's normalised step turns rounding noise into lr-sized moves: skip those.
    compared = [k for k in a if not k.endswith("to_k.bias")]
    assert len(compared) > 0.8 * len(a)
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in compared)
