"""Token-only training: a planted low-rank target is recovered, runs resume exactly, the generator stays frozen."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from refinestyle.adaptation import Adapter
from refinestyle.adaptation.train import (
    CHECKPOINT_NAME,
    adapt_oneshot,
    cosine_lr,
    default_mix_index,
    history_summary,
    init_tokens_from_refinement,
    mixed_codes,
    train_tokens,
)
from refinestyle.distributed import TrainingInterrupted
from refinestyle.generator import Generator
from refinestyle.refinement import Refinement
from triton_interpreter_bf16 import triton_test_device


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_generator(size: int = 32, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(size, style_dim=32, n_mlp=2, channel_max=16).eval().requires_grad_(False)


def paired_batch(generator, count: int, seed: int):
    """Fixed codes and noise: the paired samples that source and target share."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = generator.style(torch.randn(count, generator.style_dim, generator=rng))
    noise = [torch.randn(count, 1, n.shape[-2], n.shape[-1], generator=rng) for n in generator.make_noise()]
    return w[:, None].repeat(1, generator.n_latent, 1), noise


def test_planted_low_rank_target_is_recovered(tmp_path):
    generator = tiny_generator(size=16)
    # the target generator = the same generator + a known refinement of every conv layer (rank 2)
    torch.manual_seed(1)
    planted = Adapter.for_generator(generator, num_tokens=2, scale_init=0.1)
    torch.manual_seed(2)
    adapter = Adapter.for_generator(generator, num_tokens=4)  # more tokens than planted, random start

    w, noise = paired_batch(generator, 16, seed=3)
    w_test, noise_test = paired_batch(generator, 8, seed=4)
    with torch.no_grad():
        target = generator.synthesis(w, refinement=planted.refinement(), noise=noise)
        target_test = generator.synthesis(w_test, refinement=planted.refinement(), noise=noise_test)

    def held_out_error() -> float:
        with torch.no_grad():
            return F.mse_loss(generator.synthesis(w_test, refinement=adapter.refinement(), noise=noise_test),
                              target_test).item()

    def step_loss(refinement, step, rng):
        return F.mse_loss(generator.synthesis(w, refinement=refinement, noise=noise), target), {}

    before = held_out_error()
    history = train_tokens(generator, adapter, step_loss, iterations=200, lr=1e-2, work_dir=tmp_path,
                           sample_every=0, checkpoint_every=0, progress=False)
    first, last = history[0]["loss"], sum(e["loss"] for e in history[-5:]) / 5
    assert first > 0.05  # the planted residual is visible
    assert last < first / 10, (first, last)
    assert held_out_error() < before / 3  # it learned the residual, not just the 16 training images
    assert all(p.grad is None for p in generator.parameters())
    assert (tmp_path / CHECKPOINT_NAME).is_file() and (tmp_path / "loss.png").is_file()


def resumable_run():
    """A tiny generator, a step loss whose random draws matter, fresh adapters (each as a new
    process would start one) and the loss's codes and noise."""
    generator = tiny_generator(size=16)
    w, noise = paired_batch(generator, 2, seed=0)
    with torch.no_grad():
        target = generator.synthesis(w, noise=noise).flip(-1)

    def step_loss(refinement, step, rng):
        # the step's random draw matters: a resumed run must draw the same numbers
        jitter = torch.randn(w.shape, generator=rng) * 0.1
        return F.mse_loss(generator.synthesis(w + jitter, refinement=refinement, noise=noise), target), {}

    def fresh():
        torch.manual_seed(7)
        return Adapter.for_generator(generator, num_refined=3, num_tokens=3)

    return generator, step_loss, fresh, (w, noise)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    generator, step_loss, fresh, (w, noise) = resumable_run()
    straight = fresh()
    train_tokens(generator, straight, step_loss, iterations=6, work_dir=tmp_path / "a", progress=False,
                 sample_every=0, checkpoint_every=0)

    interrupted = fresh()
    sample_calls = []

    def sample_fn(refinement):
        sample_calls.append(refinement)
        return generator.synthesis(w, refinement=refinement, noise=noise), 2

    train_tokens(generator, interrupted, step_loss, iterations=3, work_dir=tmp_path / "b", progress=False,
                 sample_every=3, sample_fn=sample_fn)
    resumed = fresh()  # a new process: fresh random tokens, then the checkpoint
    history = train_tokens(generator, resumed, step_loss, iterations=6, work_dir=tmp_path / "b", resume=True,
                           progress=False, sample_every=3, sample_fn=sample_fn)
    assert [e["step"] for e in history] == list(range(1, 7))
    for mine, theirs in zip(straight.tokens.state_dict().values(), resumed.tokens.state_dict().values()):
        assert torch.allclose(mine, theirs, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "b" / "samples").glob("*.png")) == [
        "step_000000.png", "step_000003.png", "step_000006.png"
    ]

    # Ctrl-C keeps the steps already taken: the checkpoint holds them and --resume finishes the run
    def interrupting_loss(refinement, step, rng):
        if step == 4:
            raise KeyboardInterrupt
        return step_loss(refinement, step, rng)

    with pytest.raises(KeyboardInterrupt):
        train_tokens(generator, fresh(), interrupting_loss, iterations=6, work_dir=tmp_path / "c", progress=False,
                     sample_every=0, checkpoint_every=0)
    assert torch.load(tmp_path / "c" / CHECKPOINT_NAME, weights_only=False)["step"] == 4
    finished = fresh()
    train_tokens(generator, finished, step_loss, iterations=6, work_dir=tmp_path / "c", resume=True, progress=False,
                 sample_every=0)
    for mine, theirs in zip(straight.tokens.state_dict().values(), finished.tokens.state_dict().values()):
        assert torch.allclose(mine, theirs, atol=1e-6)

    other = Adapter.for_generator(generator, num_refined=2, num_tokens=3)
    with pytest.raises(ValueError, match="--num-refined: 3 in the checkpoint, 2 in this run"):
        train_tokens(generator, other, step_loss, iterations=6, work_dir=tmp_path / "b", resume=True, progress=False)
    # the same tokens for another domain: resuming would train one adapter on two targets
    retargeted = fresh()
    retargeted.metadata.update(kind="text", target_text="watercolor")
    checkpoint = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=False)
    checkpoint["metadata"].update(kind="text", target_text="pencil sketch")
    torch.save(checkpoint, tmp_path / "b" / CHECKPOINT_NAME)
    message = "--target \\(target_text\\): 'pencil sketch' in the checkpoint, 'watercolor' in this run"
    with pytest.raises(ValueError, match=message):
        train_tokens(generator, retargeted, step_loss, iterations=8, work_dir=tmp_path / "b", resume=True,
                     progress=False)


def test_cosine_schedule_is_gogas_and_resumes_exactly(tmp_path, monkeypatch):
    """GOGA anneals its one-shot rate with CosineAnnealingLR(T_max=steps, eta_min=1e-4), stepped with
    epoch=step after each update; train_tokens(lr_min=...) takes those rates, also after a resume."""
    import warnings

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20, eta_min=1e-4)
    gogas = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step(epoch=...) is deprecated, and what GOGA calls
        for step in range(20):
            gogas.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step(epoch=step)
    assert [cosine_lr(step, 20, 1e-3, 1e-4) for step in range(20)] == pytest.approx(gogas, rel=1e-12)
    assert gogas[0] == gogas[1] == 1e-3 and gogas[-1] < 1.3e-4  # step 19 takes the rate at 18 of 20

    rates = []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    generator, step_loss, fresh, _ = resumable_run()
    straight = fresh()
    train_tokens(generator, straight, step_loss, iterations=6, lr=1e-2, lr_min=1e-3, work_dir=tmp_path / "a",
                 progress=False, sample_every=0, checkpoint_every=0)
    assert rates == pytest.approx([cosine_lr(step, 6, 1e-2, 1e-3) for step in range(6)], rel=1e-12)
    rates.clear()

    def interrupting_loss(refinement, step, rng):  # Ctrl-C during step 3: the checkpoint keeps steps 0-2
        if step == 3:
            raise KeyboardInterrupt
        return step_loss(refinement, step, rng)

    with pytest.raises(KeyboardInterrupt):
        train_tokens(generator, fresh(), interrupting_loss, iterations=6, lr=1e-2, lr_min=1e-3,
                     work_dir=tmp_path / "b", progress=False, sample_every=0, checkpoint_every=0)
    resumed = fresh()
    train_tokens(generator, resumed, step_loss, iterations=6, lr=1e-2, lr_min=1e-3, work_dir=tmp_path / "b",
                 resume=True, progress=False, sample_every=0)
    assert rates == pytest.approx([cosine_lr(step, 6, 1e-2, 1e-3) for step in range(6)], rel=1e-12)
    for mine, theirs in zip(straight.tokens.state_dict().values(), resumed.tokens.state_dict().values()):
        assert torch.allclose(mine, theirs, atol=1e-6)
    with pytest.raises(ValueError, match="--lr-min: 0.001 in the checkpoint, None in this run"):
        train_tokens(generator, fresh(), step_loss, iterations=6, lr=1e-2, work_dir=tmp_path / "b", resume=True,
                     progress=False)
    with pytest.raises(ValueError, match="lr_min"):
        train_tokens(generator, fresh(), step_loss, iterations=6, lr=1e-2, lr_min=0.1, progress=False)


def test_resume_refuses_other_settings_fewer_iterations_and_a_broken_checkpoint(tmp_path):
    """What a checkpoint fixed (lr, seed, ...) must be the resuming run's: Adam's saved state would
    train on at the old lr while the metadata named the new one. --iterations is the total."""
    from refinestyle.adaptation.train import adapt_text

    generator = tiny_generator(size=16)

    def mirror_loss(source, adapted):
        return ((adapted - source.flip(-1)) ** 2).mean()

    def run(iterations, **changes):
        settings = dict(num_refined=2, num_tokens=2, iterations=iterations, batch_size=2, lr=1e-2, seed=0,
                        truncation=1.0, work_dir=tmp_path, sample_every=0, progress=False)
        return adapt_text(generator, mirror_loss, resume=True, **{**settings, **changes})

    first, _ = run(3)
    assert first.metadata["training"]["steps_done"] == 3
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    with pytest.raises(ValueError) as refused:
        run(5, lr=0.5, seed=5, batch_size=3, truncation=0.7, scale_init=0.2)
    message = str(refused.value)
    for option in ("--lr: 0.01 in the checkpoint, 0.5 in this run", "--seed: 0 in the checkpoint, 5 in this run",
                   "--batch-size: 2", "--truncation: 1.0", "--scale-init"):
        assert option in message, message
    with pytest.raises(ValueError, match="--iterations: .* already holds 3 steps, more than the 2 asked for"):
        run(2)
    assert torch.equal(torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["tokens"]["layers.0.A"],
                       saved["tokens"]["layers.0.A"])  # the refused runs changed nothing

    # as many iterations as done: the adapter as it is; more: trained on, and the metadata says how far
    same, history = run(3)
    assert len(history) == 3 and same.metadata["training"]["steps_done"] == 3
    assert torch.equal(same.tokens.layers[0].A, first.tokens.layers[0].A)
    further, history = run(5)
    assert [e["step"] for e in history] == [1, 2, 3, 4, 5]
    assert further.metadata["training"]["steps_done"] == 5 and further.metadata["training"]["iterations"] == 5
    assert further.metadata["training"]["lr"] == 1e-2

    (tmp_path / CHECKPOINT_NAME).write_text("junk\n")
    with pytest.raises(ValueError, match=f"{CHECKPOINT_NAME}: not a readable adaptation checkpoint"):
        run(6)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_and_resume_finishes_the_run(tmp_path, signum):
    """Ctrl-C (or a scheduler's SIGTERM) in the middle of step 2: that step finishes, the checkpoint
    holds 3 steps, and --resume ends where the uninterrupted run ends."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread only")
    generator, step_loss, fresh, _ = resumable_run()
    straight = fresh()
    train_tokens(generator, straight, step_loss, iterations=6, work_dir=tmp_path / "a", progress=False,
                 sample_every=0, checkpoint_every=0)

    def signalled_loss(refinement, step, rng):
        if step == 2:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)  # repeated at once (torchrun's agent forwards it): one request
        return step_loss(refinement, step, rng)

    with pytest.raises(TrainingInterrupted) as stopped:
        train_tokens(generator, fresh(), signalled_loss, iterations=6, work_dir=tmp_path / "b", progress=False,
                     sample_every=0, checkpoint_every=0)
    assert (stopped.value.signum, stopped.value.step) == (signum, 3)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    saved = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=False)
    assert saved["step"] == 3 and len(saved["history"]) == 3
    finished = fresh()
    train_tokens(generator, finished, step_loss, iterations=6, work_dir=tmp_path / "b", resume=True, progress=False,
                 sample_every=0)
    for mine, theirs in zip(straight.tokens.state_dict().values(), finished.tokens.state_dict().values()):
        assert torch.equal(mine, theirs)


def test_a_second_ctrl_c_during_the_update_saves_a_consistent_checkpoint(tmp_path, monkeypatch):
    """A second Ctrl-C (the user insisting) raises at once, and the run saves what it has. One that
    lands inside the optimizer's update is raised after the update is counted, so the checkpoint's
    step count, its history and Adam's state agree, and a resume does not apply a step twice."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread only")
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from refinestyle.adaptation import train as train_module
    from refinestyle.distributed import StopOnSignal

    monkeypatch.setattr(train_module, "StopOnSignal", lambda: StopOnSignal(insist_after=0))
    generator, step_loss, fresh, _ = resumable_run()
    updates = []

    def insist_inside_the_third_update(optimizer, args, kwargs):
        updates.append(1)
        if len(updates) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first request: stop after this step
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)  # insisting: raise now
            time.sleep(0.01)

    handle = register_optimizer_step_post_hook(insist_inside_the_third_update)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_tokens(generator, fresh(), step_loss, iterations=6, work_dir=tmp_path, progress=False,
                         sample_every=0, checkpoint_every=0)
    finally:
        handle.remove()
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    adam_steps = {int(state["step"]) for state in saved["optimizer"]["state"].values()}
    assert saved["step"] == 3 and len(saved["history"]) == 3 and adam_steps == {3}


def test_a_gradient_into_the_generator_is_refused():
    generator = tiny_generator(size=16)
    adapter = Adapter.for_generator(generator, num_refined=2, num_tokens=2)
    w, noise = paired_batch(generator, 1, seed=0)

    def leaky_loss(refinement, step, rng):
        generator.conv1.conv.weight.requires_grad_(True)  # a bug elsewhere unfreezes a weight
        return generator.synthesis(w, refinement=refinement, noise=noise).square().mean(), {}

    with pytest.raises(RuntimeError, match="frozen"):
        train_tokens(generator, adapter, leaky_loss, iterations=1, progress=False)


def test_tokens_initialised_from_an_inverters_refinement():
    generator = tiny_generator(size=16)
    shapes = generator.layer_shapes()
    torch.manual_seed(0)

    def inverted(num_refined, tokens):
        p = [torch.randn(1, tokens, cout) * 0.1 for _, cout in shapes[-num_refined:]]
        q = [torch.randn(1, tokens, cin) * 0.1 for cin, _ in shapes[-num_refined:]]
        return Refinement(p, q, generator.num_layers)

    def residuals(refinement):
        return {
            layer: refinement.for_layer(layer)[0].reshape(-1, shapes[layer][1]).T
            @ refinement.for_layer(layer)[1].reshape(-1, shapes[layer][0])
            for layer in range(refinement.first_layer, generator.num_layers)
        }

    # fewer inverter tokens than adapter tokens: the residual is copied exactly, extra tokens start at A = 0
    source = inverted(num_refined=3, tokens=2)
    adapter = Adapter.for_generator(generator, num_refined=4, num_tokens=5)
    random_layer = adapter.tokens.layers[0].P.detach().clone()
    summary = init_tokens_from_refinement(adapter, source)
    assert summary["copied"] == [2, 3, 4] and summary["random"] == [1] and summary["padded"] == [2, 3, 4]
    got, want = residuals(adapter.refinement()), residuals(source)
    for layer in (2, 3, 4):
        assert torch.allclose(got[layer], want[layer], atol=1e-6)
    assert torch.equal(adapter.tokens.layers[0].P, random_layer)
    assert torch.all(adapter.tokens.layers[1].A[2:] == 0)
    assert torch.allclose(adapter.tokens.layers[1].P.square().mean(1)[:2], torch.ones(2), atol=1e-5)

    # more inverter tokens than adapter tokens: the best rank-L approximation (Eckart-Young)
    source = inverted(num_refined=5, tokens=6)
    adapter = Adapter.for_generator(generator, num_refined=2, num_tokens=2)
    summary = init_tokens_from_refinement(adapter, source)
    assert summary["truncated"] == [3, 4] and summary["dropped"] == [0, 1, 2]
    got, want = residuals(adapter.refinement()), residuals(source)
    for layer in (3, 4):
        u, s, vh = torch.linalg.svd(want[layer].double())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert torch.allclose(got[layer].double(), best, atol=1e-5)
        assert torch.linalg.matrix_rank(got[layer]) == 2

    with pytest.raises(ValueError, match="ONE image"):
        batch_of_two = Refinement([t.repeat(2, 1, 1) for t in source.p], [t.repeat(2, 1, 1) for t in source.q], 5)
        init_tokens_from_refinement(adapter, batch_of_two)


def test_mixed_codes_and_a_short_oneshot_run(tmp_path):
    from refinestyle.adaptation.swd import LPIPSFeatures, SWDStyleLoss
    from refinestyle.losses import LPIPSLoss, ReconstructionLoss

    assert default_mix_index(18) == 8 and default_mix_index(8) == 4
    content, reference = torch.randn(3, 8, 4), torch.randn(1, 8, 4)
    mixed = mixed_codes(content, reference, 4)
    assert torch.equal(mixed[:, :4], content[:, :4]) and torch.equal(mixed[:, 4:], reference[:, 4:].expand(3, -1, -1))

    generator = tiny_generator(size=32)
    torch.manual_seed(0)
    lpips = LPIPSLoss(pretrained_backbone=False)
    reconstruction = ReconstructionLoss(1.0, 0.8, 0.0, lpips_module=lpips)
    style = SWDStyleLoss(LPIPSFeatures(lpips, layers=(2, 3), input_size=None), num_projections=16)
    reference_image = torch.rand(1, 3, 40, 40) * 2 - 1
    w_r = generator.style(torch.randn(1, 32))[:, None].repeat(1, generator.n_latent, 1)
    init = Refinement([torch.randn(1, 2, c) * 0.1 for _, c in generator.layer_shapes()[-2:]],
                      [torch.randn(1, 2, c) * 0.1 for c, _ in generator.layer_shapes()[-2:]], generator.num_layers)
    adapter, history = adapt_oneshot(
        generator, reference_image, w_r, reconstruction, style, num_refined=3, num_tokens=4, init_refinement=init,
        iterations=3, batch_size=2, work_dir=tmp_path, sample_every=3, progress=False, metadata={"reference": "r.png"},
    )
    assert len(history) == 3 and {"rec", "style", "rec_l2", "rec_lpips"} <= set(history[0])
    assert adapter.metadata["kind"] == "oneshot" and adapter.metadata["token_init"]["copied"] == [5, 6]
    assert adapter.metadata["training"]["mix_index"] == default_mix_index(generator.n_latent)
    assert (tmp_path / "samples" / "step_000003.png").is_file()
    with pytest.raises(ValueError, match="w_r"):
        adapt_oneshot(generator, reference_image, w_r[:, :3], reconstruction, style, iterations=1, progress=False)


def test_projection_finds_a_code_that_reproduces_the_image():
    from refinestyle.adaptation.projection import noise_regularisation, project
    from refinestyle.losses import LPIPSLoss

    generator = tiny_generator(size=32)
    with torch.no_grad():
        for name, parameter in generator.named_parameters():
            if name.endswith("noise.weight"):
                parameter.fill_(0.1)
        w = generator.style(torch.randn(1, 32, generator=torch.Generator().manual_seed(9)))
        target = generator.synthesis(w[:, None].repeat(1, generator.n_latent, 1), randomize_noise=False)
        mean = generator.style(torch.randn(4096, 32)).mean(0)
        start = F.mse_loss(generator.synthesis(mean[None, None].repeat(1, generator.n_latent, 1),
                                               randomize_noise=False), target).item()
    torch.manual_seed(0)
    lpips = LPIPSLoss(pretrained_backbone=False)  # a random backbone: a distance, if not a perceptual one
    result = project(generator, target, lpips, steps=60, mse_weight=1.0, progress=False)
    assert result.w_plus.shape == (1, generator.n_latent, 32) and len(result.noise) == generator.num_layers
    assert F.mse_loss(result.image, target).item() < start / 5
    for noise in result.noise:  # renormalised after every step
        assert abs(noise.mean().item()) < 1e-4 and abs(noise.std().item() - 1) < 1e-3
    assert noise_regularisation([torch.ones(1, 1, 16, 16)]) > noise_regularisation([torch.randn(1, 1, 16, 16)])
    assert all(p.grad is None for p in generator.parameters())


def test_history_summary_windows_never_overlap():
    history = [{"step": t, "loss": float(t)} for t in range(1, 31)]
    summary = history_summary(history)
    assert summary == {"window": 10, "loss_first": 5.5, "loss_last": 25.5}
    short = history_summary(history[:6])  # 6 steps: first 3 and last 3, not all 6 twice
    assert short == {"window": 3, "loss_first": 2.0, "loss_last": 5.0}
    assert history_summary(history[:1]) == {"window": 1, "loss_first": 1.0, "loss_last": 1.0}
    assert history_summary([]) == {}
    # a run resumed with a loss term switched off logs it for its first steps only
    mixed = [{"step": 1, "loss": 4.0, "rec_id": 1.0}, {"step": 2, "loss": 2.0}]
    assert history_summary(mixed) == {"window": 1, "loss_first": 4.0, "loss_last": 2.0, "rec_id_first": 1.0,
                                      "rec_id_last": None}


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bf16_autocast_renders_in_bf16_and_keeps_the_tokens_float32(tmp_path, backend):
    """`--bf16`. With backend="triton" the convs run the fused kernels in bf16 (compiled on a
    GPU, in the interpreter on a CPU)."""
    from refinestyle.adaptation.train import adapt_text

    generator = tiny_generator(size=16 if backend == "auto" else 8)  # 8 px: the interpreter is slow
    if backend == "triton":
        generator.backend = "triton"
        if triton_test_device(torch.bfloat16) == "cuda":
            generator.cuda()

    def mirror_loss(source, adapted):
        return ((adapted.float() - source.float().flip(-1)) ** 2).mean()

    seen = []
    hook = generator.convs[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    runs = {}
    try:
        for bf16 in (False, True):
            seen.clear()
            adapter, history = adapt_text(generator, mirror_loss, num_tokens=4, scale_init=0.1, iterations=3,
                                          batch_size=2, lr=1e-2, truncation=0.7, progress=False, bf16=bf16)
            runs[bf16] = (adapter, history, set(seen))
    finally:
        hook.remove()
    assert runs[False][2] == {torch.float32} and runs[True][2] == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in runs[True][0].parameters())
    assert runs[True][0].metadata["training"]["bf16"] is True
    # the same steps up to bf16 rounding (and training moved the loss)
    for fp32_step, bf16_step in zip(runs[False][1], runs[True][1]):
        assert bf16_step["loss"] == pytest.approx(fp32_step["loss"], rel=3e-2)
    assert runs[True][1][-1]["loss"] != runs[True][1][0]["loss"]
