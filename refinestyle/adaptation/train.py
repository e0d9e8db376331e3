"""Token-only domain adaptation: text-driven (vs StyleGAN-NADA) and one-shot (vs GOGA).

The generator stays frozen; only an Adapter's tokens P, Q and scales A, B train
(paper Sec. 3.4). Both tasks share one loop, `train_tokens`:

- Adam on the adapter's parameters only; the generator's parameters are frozen
  (requires_grad False) and checked to receive no gradient at every step;
- every random draw of step t comes from a generator seeded by (seed, t), so a run
  resumed from a checkpoint takes exactly the steps the uninterrupted run would have;
- `work_dir/checkpoint.pt` (tokens, Adam state, step, loss history) every
  `checkpoint_every` steps and at the end; `resume=True` continues from it;
- `work_dir/samples/step_XXXXXX.png`: source | adapted images for fixed seeds every
  `sample_every` steps; `work_dir/loss.png`: the loss curves; a tqdm progress bar;
- several processes (`torchrun`, pass `distributed=setup_distributed()`): every process
  draws the step's whole batch from the same seeded generator and renders its own share
  (`batch_share`); the tokens' gradients are averaged over the processes, so N processes
  take the steps one process would take with the same batch; rank 0 writes the files.

Text-driven (`adapt_text`): each step samples `batch_size` codes, renders them with the
frozen and the refined generator under the same noise, and minimises the CLIP
directional loss (Eq. 7). Paper defaults: Adam, lr 1e-3, 300 steps, batch 2, all layers,
L = 256; as StyleGAN-NADA, Adam's betas (0, 0.99) and untruncated training codes (samples
shown at psi 0.7).

One-shot (`adapt_oneshot`): with the reference I_r and its code w_r,
    L = L_rec(G_hat(w_r), I_r) + style_weight * SWD(G_hat(w_g), I_r),
L_rec being Eq. 6 (L2 + LPIPS + ID) and w_g = [w_c, w_r]: rows < mix_index from the
mapped random z (content), the rest from w_r (the reference's texture). Defaults follow
GOGA: 600 steps, batch 1, Adam lr 1e-3 with betas (0, 0.999), codes truncated to 0.7,
mixing after row 8 of 18 (scaled to the generator's n_latent).
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.adaptation.adapter import Adapter
from refinestyle.adaptation.swd import SWDStyleLoss
from refinestyle.distributed import (
    DistributedContext,
    StopOnSignal,
    TrainingInterrupted,
    average_gradients,
    batch_share,
    broadcast_from_main,
    mean_over_processes,
)
from refinestyle.refinement import Refinement
from refinestyle.weights import weights_fingerprint

__all__ = [
    "train_tokens",
    "adapt_text",
    "adapt_oneshot",
    "sample_codes",
    "mixed_codes",
    "default_mix_index",
    "init_tokens_from_refinement",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
_STEP_SEED_STRIDE = 1_000_003

# A step's loss: (refinement of the adapter, step index, CPU torch.Generator seeded for the step)
#   -> (scalar loss with gradient to the refinement, dict of floats to log)
StepLoss = Callable[[Refinement, int, torch.Generator], "tuple[torch.Tensor, dict[str, float]]"]
# Sample rendering: (refinement) -> (images [N, 3, H, W] in [-1, 1], images per grid row)
SampleFn = Callable[[Refinement], "tuple[torch.Tensor, int]"]


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _STEP_SEED_STRIDE + step)


def _noise(generator: nn.Module, batch: int, rng: torch.Generator, device) -> list[torch.Tensor]:
    """Per-sample noise maps [batch, 1, r, r] for every conv layer, drawn from `rng` (CPU)."""
    return [
        torch.randn(batch, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), generator=rng).to(device)
        for i in range(generator.num_layers)
    ]


@torch.no_grad()
def sample_codes(
    generator: nn.Module,
    batch: int,
    rng: torch.Generator,
    truncation: float = 1.0,
    truncation_latent: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """w+ codes [batch, n_latent, style_dim] of random z drawn from `rng`, truncated towards the mean w.

    truncation: psi (1: none); truncation_latent: [1, style_dim] or [style_dim] mean w (default:
    the generator's latent_avg; required for truncation < 1 when it has none).
    """
    device = _device_of(generator)
    z = torch.randn(batch, generator.style_dim, generator=rng).to(device)
    w = generator.style(z)
    if truncation < 1:
        mean = truncation_latent if truncation_latent is not None else generator.latent_avg
        if mean is None:
            raise ValueError("truncation_latent: required for truncation < 1 when the generator has no latent_avg")
        w = mean.reshape(1, -1) + truncation * (w - mean.reshape(1, -1))
    return w[:, None].repeat(1, generator.n_latent, 1)


def default_mix_index(n_latent: int) -> int:
    """GOGA's mixing row, 8 of 18 latent rows at 1024 px, scaled to other generators."""
    return max(1, min(n_latent - 1, round(n_latent * 8 / 18)))


def mixed_codes(content: torch.Tensor, reference: torch.Tensor, mix_index: int) -> torch.Tensor:
    """w_g = [w_c, w_r]: rows < mix_index from `content` [B, n, C], the rest from `reference` [1, n, C]."""
    if content.ndim != 3 or reference.ndim != 3 or reference.shape[1:] != content.shape[1:]:
        raise ValueError(
            f"content, reference: expected [B, n_latent, C] and [1, n_latent, C], got {tuple(content.shape)} and "
            f"{tuple(reference.shape)}"
        )
    if not 0 <= mix_index <= content.shape[1]:
        raise ValueError(f"mix_index: expected an integer in [0, {content.shape[1]}], got {mix_index}")
    return torch.cat([content[:, :mix_index], reference[:, mix_index:].expand(content.shape[0], -1, -1)], 1)


def _plot_history(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({key for entry in history for key in entry if key != "step"})
    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = [entry["step"] for entry in history]
    for key in keys:
        axis.plot(steps, [entry.get(key, math.nan) for entry in history], label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    if all(entry.get(key, 1) > 0 for entry in history for key in keys):
        axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# Adapter metadata (its own entries and those of its "training" dict) that may change when a run
# resumes: where the input files lie (their contents are compared through their fingerprints), how
# long to train, and what the first run derived from its settings. Every other entry that the
# checkpoint and the resuming run both hold must match, or the adapter would be trained under two
# settings while its metadata names one.
RESUMABLE_KEYS = frozenset(
    {"generator_file", "reference", "inverter_file", "token_init", "iterations", "steps_done", "sample_truncation"}
)
# the command-line option behind a metadata entry, where it is not "--" + the entry's name
SETTING_OPTIONS = {
    "kind": "the task (adapt-text / adapt-oneshot)",
    "source_text": "--source",
    "target_text": "--target",
    "clip_models": "--clip / --clip-vit-b16 / --clip-vit-b32",
    "clip_fingerprints": "--clip / --clip-vit-b16 / --clip-vit-b32 (the weights file)",
    "clip_quick_gelu": "--clip-no-quick-gelu",
    "generator_fingerprint": "--generator",
    "generator_size": "--generator",
    "generator_style_dim": "--generator",
    "generator_num_layers": "--generator",
    "layer_shapes": "--num-refined / --generator",
    "loss_networks_sha256": "--lpips-backbone / --ir-se50 (the weights files)",
    "reference_sha256": "--reference",
    "w_r_source": "--inverter",
    "inverter_sha256": "--inverter",
    "reconstruction_weights": "--l2-weight / --lpips-weight / --id-weight",
    "betas": "Adam's betas",
    "loss": "the loss",
}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state in a work folder's checkpoint.pt; ValueError naming the file when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file raises pickle's, zip's or torch's errors
        raise ValueError(
            f"{path}: not a readable adaptation checkpoint ({_first_line(error)}); start over with --restart"
        ) from error
    missing = [key for key in ("step", "tokens", "optimizer", "history", "metadata")
               if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path}: not an adaptation checkpoint (no {', '.join(missing)}); start over with --restart")
    return state


def _first_line(error: BaseException) -> str:
    """The error's type and the first line of its message (torch.load's can run to many lines)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _flat_settings(metadata: dict[str, Any]) -> dict[str, Any]:
    """An adapter's metadata entries and its training settings in one dict (their names do not clash)."""
    flat = {key: value for key, value in metadata.items() if key != "training"}
    flat.update(metadata.get("training") or {})
    return flat


def _same_setting(saved: Any, wanted: Any) -> bool:
    """Equal, floats up to float32 rounding (a scale_init read back from the tokens is 0.00999999977)."""
    if isinstance(saved, (list, tuple)) and isinstance(wanted, (list, tuple)):
        return len(saved) == len(wanted) and all(map(_same_setting, saved, wanted))
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return saved.keys() == wanted.keys() and all(_same_setting(saved[k], wanted[k]) for k in saved)
    if _is_number(saved) and _is_number(wanted):
        return math.isclose(saved, wanted, rel_tol=1e-6, abs_tol=1e-12)
    return saved == wanted


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = repr(value)
    return text[:20] + "...'" if isinstance(value, str) and len(value) > 40 else text  # a fingerprint: its start


def resume_conflicts(saved_metadata: dict[str, Any], metadata: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's adapter metadata and a resuming run's, one
    "OPTION: SAVED in the checkpoint, NEW in this run" per option (RESUMABLE_KEYS may differ;
    entries only one side has are not compared, so older checkpoints still resume)."""
    saved, wanted = _flat_settings(saved_metadata), _flat_settings(metadata)
    conflicts: dict[str, str] = {}
    for key in saved:
        if key in RESUMABLE_KEYS or key not in wanted or _same_setting(saved[key], wanted[key]):
            continue
        option = SETTING_OPTIONS.get(key, "--" + key.replace("_", "-"))
        named = option if option == "--" + key.replace("_", "-") else f"{option} ({key})"
        conflicts.setdefault(
            option, f"{named}: {_shown(saved[key])} in the checkpoint, {_shown(wanted[key])} in this run"
        )
    return list(conflicts.values())


def check_resume(checkpoint_path: str | os.PathLike, metadata: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint and raise ValueError, naming every option that differs, unless its settings are
    `metadata`'s (see resume_conflicts; `metadata` may hold only some entries, to check them before a
    long preparation). Returns the checkpoint's state."""
    state = read_checkpoint(checkpoint_path)
    saved = state["metadata"]
    if "settings" in state:  # train_tokens' own arguments, for adapters whose metadata lacks them
        saved = {**saved, "training": {**state["settings"], **(saved.get("training") or {})}}
    conflicts = resume_conflicts(saved, metadata)
    if conflicts:
        raise ValueError(
            f"--resume: {checkpoint_path} was trained with other settings: {'; '.join(conflicts)}. Resume with "
            "the checkpoint's settings, or start over with --restart or another --work-dir"
        )
    return state


def cosine_lr(step: int, iterations: int, lr: float, lr_min: float) -> float:
    """The learning rate of step `step` (0-based) of `iterations` under GOGA's schedule.

    GOGA steps torch's CosineAnnealingLR(T_max=iterations, eta_min=lr_min) with epoch=step after
    each update, so steps 0 and 1 both take lr and step t >= 1 takes the closed form at t - 1:
    lr_min + (lr - lr_min) (1 + cos(pi (t - 1) / iterations)) / 2.
    """
    progress = max(step - 1, 0) / max(iterations, 1)
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * progress)) / 2


def train_tokens(
    generator: nn.Module,
    adapter: Adapter,
    step_loss: StepLoss,
    *,
    iterations: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    seed: int = 0,
    work_dir: Optional[str | os.PathLike] = None,
    checkpoint_every: int = 50,
    sample_every: int = 50,
    sample_fn: Optional[SampleFn] = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "adapting",
    distributed: Optional[DistributedContext] = None,
    bf16: bool = False,
    lr_min: Optional[float] = None,
) -> list[dict[str, float]]:
    """Optimise only `adapter`'s tokens against `step_loss`, with the generator frozen.

    generator: the refinestyle.Generator; frozen here (requires_grad_(False)); a gradient
        reaching any of its parameters raises RuntimeError.
    adapter: the Adapter whose parameters train (in place).
    step_loss: (refinement, step, rng) -> (loss, logs); rng is a CPU torch.Generator seeded
        with (seed, step) for every random draw of that step.
    iterations: total number of steps (a resumed run continues up to it; fewer than the
        checkpoint holds raise ValueError, as many write it as it is).
    lr, betas: Adam's settings.
    work_dir: folder for checkpoint.pt, samples/ and loss.png (None: nothing is written and
        resume is impossible).
    checkpoint_every, sample_every: intervals in steps (0 disables; a checkpoint is also
        written at the end, samples also at step 0 and at the end).
    sample_fn: renders the sample grid from the current refinement (no gradient).
    resume: continue from work_dir/checkpoint.pt if it exists. Its tokens must fit the adapter,
        and its settings (lr, betas, seed, bf16 and the adapter's metadata but RESUMABLE_KEYS)
        must be this run's: else ValueError naming what differs (see resume_conflicts).
    progress: show a tqdm progress bar.
    distributed: the DistributedContext of a torchrun run (None: one process). Every process
        must call this with the same arguments; step_loss computes the process's share of
        the batch (see batch_share). Rank 0 starts everyone from its tokens, gradients and
        logged values are averaged over the processes, and only rank 0 writes files.
    bf16: run step_loss under bf16 autocast (the generator's convs, the loss networks); the
        tokens, their gradients and Adam's state stay float32.
    lr_min: None for a constant learning rate; else the rate falls from lr to lr_min along a
        cosine over `iterations` steps (see cosine_lr: GOGA's CosineAnnealingLR, eta_min).
        Computed from the step number, so a resumed run takes the same rates.

    Returns the loss history: one dict per step with "step" and the logged values (the
    same on every process).
    """
    from tqdm.auto import tqdm

    from refinestyle.imageio import save_grid

    if iterations < 0:
        raise ValueError(f"iterations: expected a non-negative integer, got {iterations}")
    if lr_min is not None and not 0 <= lr_min <= lr:
        raise ValueError(f"lr_min: expected a rate in [0, lr={lr}], got {lr_min}")
    if resume and work_dir is None:
        raise ValueError("resume: needs a work_dir holding the checkpoint")
    generator.requires_grad_(False)
    for parameter in generator.parameters():
        parameter.grad = None
    adapter.train()
    parameters = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr, betas=betas)
    is_main = distributed is None or distributed.is_main
    device = _device_of(generator)
    if distributed is not None and distributed.distributed and device != distributed.device:
        raise ValueError(
            f"generator: on {device}, but this process's device is {distributed.device}; move the generator "
            "there (the collectives run on it)"
        )
    work = Path(work_dir) if work_dir is not None else None
    checkpoint_path = work / CHECKPOINT_NAME if work is not None else None

    # what this function itself fixes for a run (Adam's saved state would override a new lr silently)
    settings = {"lr": lr, "betas": list(betas), "seed": seed, "bf16": bf16, "lr_min": lr_min}
    start, history = 0, []
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        this_run = {**adapter.metadata, "training": {**settings, **(adapter.metadata.get("training") or {})}}
        state = check_resume(checkpoint_path, this_run)
        saved_shapes = state["metadata"].get("layer_shapes"), state["metadata"].get("num_tokens")
        if saved_shapes != (adapter.metadata["layer_shapes"], adapter.metadata["num_tokens"]):
            raise ValueError(
                f"{checkpoint_path}: holds tokens for layers {saved_shapes[0]} with L={saved_shapes[1]}, this run "
                f"has {adapter.metadata['layer_shapes']} with L={adapter.metadata['num_tokens']}"
            )
        start = int(state["step"])
        if start > iterations:  # --iterations is the total: training on would leave more steps than asked for
            raise ValueError(
                f"--iterations: {checkpoint_path} already holds {start} steps, more than the {iterations} asked for; "
                f"resume with --iterations {start} to write the adapter as it is, or more to train further"
            )
        try:
            adapter.tokens.load_state_dict(state["tokens"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(
                f"{checkpoint_path}: its tokens or optimizer state do not fit this run ({error})"
            ) from error
        history = list(state["history"])
        _carry_over(state["metadata"], adapter.metadata)
    broadcast_from_main(parameters, distributed)  # fresh tokens are drawn from each process's own RNG

    def save_checkpoint(step: int, wait: bool = True) -> None:
        """Rank 0 writes the checkpoint; with `wait` every process returns only once it is written
        (a process that went on at once could resume, in the same program, from the old one)."""
        if checkpoint_path is not None and is_main:
            _write_checkpoint(step)
        if wait and distributed is not None:
            distributed.barrier()

    def _write_checkpoint(step: int) -> None:
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "tokens": {k: v.detach().cpu() for k, v in adapter.tokens.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "history": history,
            "metadata": adapter.metadata,
            "settings": settings,
        }
        temporary = checkpoint_path.with_suffix(".tmp")
        torch.save(state, temporary)
        os.replace(temporary, checkpoint_path)  # never leave a half-written checkpoint behind
        if history:
            _plot_history(history, work / "loss.png")

    def save_samples(step: int) -> None:
        if work is None or sample_fn is None or not is_main:
            return
        with torch.no_grad():
            images, nrow = sample_fn(adapter.refinement().detach())
        save_grid(images, work / "samples" / f"step_{step:06d}.png", nrow=nrow)

    if start == 0 and sample_every:
        save_samples(0)
    bar = tqdm(range(start, iterations), desc=description, unit="step", disable=not (progress and is_main),
               initial=start, total=iterations)
    done = start
    # Ctrl-C / SIGTERM: every process finishes the step, the checkpoint keeps it, --resume goes on
    with StopOnSignal() as stop:
        try:
            for step in bar:
                if lr_min is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = cosine_lr(step, iterations, lr, lr_min)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss, logs = step_loss(adapter.refinement(), step, _step_generator(seed, step))
                loss = loss.float()
                # the batch's values (every process's share averaged): the same on every process, so
                # that all of them raise together on a non-finite loss instead of leaving one waiting,
                # and all of them stop after the same step when any was asked to
                logged = mean_over_processes({"loss": loss, **logs, **stop.vote()}, distributed, device=device)
                stopping = stop.agreed(logged)
                if not math.isfinite(logged["loss"]):
                    raise FloatingPointError(
                        f"step {step}: the loss is {logged['loss']}: training diverged (a learning rate or "
                        "scale_init too large?); a resumed run keeps its settings, so start over (--restart) with "
                        "a lower --lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if any(p.grad is not None for p in generator.parameters()):
                    raise RuntimeError("a generator parameter received a gradient: the generator must stay frozen")
                average_gradients(parameters, distributed)
                entry = {"step": step + 1, **logged}
                with stop.deferred():  # a second Ctrl-C lands before the update or after its count
                    optimizer.step()
                    history.append(entry)
                    done = step + 1
                bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k != "step"})
                if sample_every and (done % sample_every == 0 or done == iterations):
                    save_samples(done)
                if checkpoint_every and done % checkpoint_every == 0 and done != iterations:
                    save_checkpoint(done)
                if stopping and done != iterations:
                    save_checkpoint(done)
                    raise stop.interrupted(done)
        except TrainingInterrupted:
            bar.close()
            raise
        except KeyboardInterrupt:
            # raised in the middle of a step (a second Ctrl-C): the checkpoint keeps the steps finished;
            # the other processes are not at this point, so nobody waits for them
            bar.close()
            save_checkpoint(done, wait=False)
            raise
    save_checkpoint(max(start, iterations))
    adapter.eval()
    return history


def _carry_over(saved_metadata: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Copy into a resumed run's metadata what only the first run knew (e.g. how its tokens were
    initialised: token_init), so that the adapter file describes all of its training."""
    for key, value in saved_metadata.items():
        if key == "training" and isinstance(value, dict) and isinstance(metadata.get("training"), dict):
            for setting, saved in value.items():
                metadata["training"].setdefault(setting, saved)
        else:
            metadata.setdefault(key, value)


def _steps_done(history: list[dict[str, float]]) -> int:
    """The steps the tokens have taken, a resumed run's earlier ones included."""
    return int(history[-1]["step"]) if history else 0


def _training_metadata(**settings: Any) -> dict[str, Any]:
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in settings.items()}


def _adapter_for_run(
    generator: nn.Module,
    adapter: Optional[Adapter],
    num_refined: Optional[int],
    num_tokens: int,
    scale_init: Optional[float],
    info: dict[str, Any],
    seed: int,
) -> Adapter:
    """`adapter` with `info` merged into its metadata, or a new Adapter for the generator carrying it,
    its tokens drawn from `seed`: the same tokens in every process and run."""
    if adapter is None:
        # The tokens are drawn on the CPU, so only the CPU generator is reseeded, and restored after.
        # Their seed is derived from `seed` (a string seed hashes the same in every process) so that
        # they are no stream a training step draws from.
        token_seed = random.Random(f"refinestyle-tokens:{seed}").getrandbits(63)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(token_seed)
            return Adapter.for_generator(generator, num_refined, num_tokens, scale_init=scale_init, **info)
    adapter.metadata.update(info)
    return adapter


def _sample_inputs(
    generator: nn.Module, num_samples: int, seed: int, truncation: float, mean: Optional[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The sample grids' fixed codes [num_samples, n_latent, style_dim] and noise maps, drawn from `seed`."""
    rng = torch.Generator().manual_seed(seed + 12345)
    codes = sample_codes(generator, num_samples, rng, truncation, mean)
    return codes, _noise(generator, num_samples, rng, _device_of(generator))


# ---------------------------------------------------------------------------------------------
# Text-driven


def adapt_text(
    generator: nn.Module,
    clip_loss: nn.Module,
    *,
    adapter: Optional[Adapter] = None,
    num_refined: Optional[int] = None,
    num_tokens: int = 256,
    scale_init: Optional[float] = None,
    iterations: int = 300,
    batch_size: int = 2,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.0, 0.99),
    truncation: float = 1.0,
    sample_truncation: float = 0.7,
    seed: int = 0,
    num_samples: int = 4,
    work_dir: Optional[str | os.PathLike] = None,
    checkpoint_every: int = 50,
    sample_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    metadata: Optional[dict[str, Any]] = None,
    distributed: Optional[DistributedContext] = None,
    bf16: bool = False,
) -> tuple[Adapter, list[dict[str, float]]]:
    """Text-driven adaptation with the CLIP directional loss (StyleGAN-NADA's setting, paper Eq. 7).

    generator: the frozen refinestyle.Generator.
    clip_loss: a CLIPDirectionalLoss (source/target text already set) or any module
        (source_images, adapted_images) -> scalar.
    adapter: tokens to train (default: Adapter.for_generator(generator, num_refined, num_tokens,
        scale_init=scale_init), its random tokens drawn from `seed`).
    iterations, batch_size, lr: the paper's 300, 2, 1e-3 by default.
    betas: Adam's betas; StyleGAN-NADA's (0, 0.99) by default (NADA raises them to the power
        4/5 for its lazy regularisation, which training tokens alone does not have).
    truncation: psi of the training codes (1: none, as StyleGAN-NADA trains; below 1 needs
        the generator's latent_avg or a sampled mean, computed from 4096 z when absent).
    sample_truncation: psi of the fixed codes of the sample grids (0.7, NADA's).
    seed: seed of every random draw; num_samples: fixed codes shown in the sample grids.
    work_dir, checkpoint_every, sample_every, resume, progress, distributed, bf16: see train_tokens;
        with several processes, batch_size is the batch of all of them together (a multiple
        of their number).
    metadata: extra entries for the adapter file.
    Returns (adapter, loss history).
    """
    device = _device_of(generator)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    share = batch_share(batch_size, distributed)
    mean = _mean_latent(generator, truncation, seed)
    settings = _training_metadata(
        iterations=iterations, batch_size=batch_size, lr=lr, betas=tuple(betas), truncation=truncation, seed=seed,
        loss="clip_directional", bf16=bf16, sample_truncation=sample_truncation,
    )
    info = {
        "kind": "text",
        "source_text": getattr(clip_loss, "source_text", None),
        "target_text": getattr(clip_loss, "target_text", None),
        "clip_models": [getattr(e, "name", "clip") for e in getattr(clip_loss, "encoders", [])],
        # which weights and activations: a resume with another file or --clip-no-quick-gelu is refused
        "clip_fingerprints": [
            weights_fingerprint(e) if isinstance(e, nn.Module) else None for e in getattr(clip_loss, "encoders", [])
        ],
        "clip_quick_gelu": [getattr(e, "quick_gelu", None) for e in getattr(clip_loss, "encoders", [])],
        "clip_weights": getattr(clip_loss, "weights", None),
        "training": settings,
        **(metadata or {}),
    }
    adapter = _adapter_for_run(generator, adapter, num_refined, num_tokens, scale_init, info, seed)

    def step_loss(refinement: Refinement, step: int, rng: torch.Generator):
        codes = sample_codes(generator, batch_size, rng, truncation, mean)[share]
        noise = [n[share] for n in _noise(generator, batch_size, rng, device)]
        with torch.no_grad():
            source = generator.synthesis(codes, noise=noise)
        adapted = generator.synthesis(codes, refinement=refinement, noise=noise)
        return clip_loss(source, adapted), {}

    sample_codes_fixed, sample_noise = _sample_inputs(
        generator, num_samples, seed, sample_truncation, _mean_latent(generator, sample_truncation, seed)
    )

    def sample_fn(refinement: Refinement):
        source = generator.synthesis(sample_codes_fixed, noise=sample_noise)
        adapted = generator.synthesis(sample_codes_fixed, refinement=refinement, noise=sample_noise)
        return torch.cat([source, adapted]), num_samples  # row 1: source, row 2: adapted

    history = train_tokens(
        generator, adapter, step_loss, iterations=iterations, lr=lr, betas=betas, seed=seed, work_dir=work_dir,
        checkpoint_every=checkpoint_every, sample_every=sample_every, sample_fn=sample_fn, resume=resume,
        progress=progress, description="adapt-text", distributed=distributed, bf16=bf16,
    )
    adapter.metadata["training"]["steps_done"] = _steps_done(history)
    return adapter, history


def _mean_latent(generator: nn.Module, truncation: float, seed: int) -> Optional[torch.Tensor]:
    """The mean w used for truncation: the checkpoint's latent_avg, else the mean of 4096 seeded z."""
    if truncation >= 1:
        return None
    if generator.latent_avg is not None:
        return generator.latent_avg.reshape(1, -1)
    rng = torch.Generator().manual_seed(seed + 777)
    with torch.no_grad():
        z = torch.randn(4096, generator.style_dim, generator=rng).to(_device_of(generator))
        return torch.cat([generator.style(chunk) for chunk in z.split(1024)]).mean(0, keepdim=True)


# ---------------------------------------------------------------------------------------------
# One-shot


@torch.no_grad()
def init_tokens_from_refinement(adapter: Adapter, refinement: Refinement) -> dict[str, Any]:
    """Initialise an adapter's tokens from one image's inverted tokens (paper Fig. 8).

    refinement: the inverter's Refinement for the reference image: per-sample tokens with
        batch size 1 ([1, L_inv, C]) or shared ([L_inv, C]), already scaled (p = A*P, q = B*Q).

    The rule, per conv layer that both refine (layers only the adapter refines keep their
    random initialisation; layers only the inverter refines are dropped):
    - L_inv <= L: the first L_inv adapter tokens take the inverter's tokens, split as
      p_l = A_l * P_l with A_l = rms(p_l) (so P_l has unit RMS like a fresh token) and the
      same for q; the remaining L - L_inv tokens keep random P, Q and B but get A = 0, so
      the initial residual is exactly the inverter's and the extra tokens start training
      from zero (A's gradient is not zero).
    - L_inv > L: the residual dW = p^T q [Cout, Cin] is truncated to its best rank-L
      approximation (SVD: dW ~ U_L S_L V_L^T, p = sqrt(S_L) U_L^T, q = sqrt(S_L) V_L^T).
    Returns a summary dict (layers copied, random, dropped; truncated or padded) that the
    caller stores in the adapter's metadata.
    """
    if refinement.batch_size not in (None, 1):
        raise ValueError(f"refinement: expected the tokens of ONE image (batch 1), got batch {refinement.batch_size}")
    if refinement.num_layers != adapter.tokens.num_layers:
        raise ValueError(
            f"refinement: built for a generator with {refinement.num_layers} conv layers, the adapter for "
            f"{adapter.tokens.num_layers}"
        )
    adapter_first = adapter.tokens.num_layers - adapter.num_refined
    summary = {"copied": [], "random": [], "dropped": [], "truncated": [], "padded": []}
    for layer in range(min(adapter_first, refinement.first_layer), adapter.tokens.num_layers):
        p, q = refinement.for_layer(layer)
        if layer < adapter_first:
            if p is not None:
                summary["dropped"].append(layer)
            continue
        if p is None:
            summary["random"].append(layer)
            continue
        tokens = adapter.tokens.layers[layer - adapter_first]
        p = p.reshape(p.shape[-2], p.shape[-1]).to(tokens.P)
        q = q.reshape(q.shape[-2], q.shape[-1]).to(tokens.Q)
        if p.shape[1] != tokens.P.shape[1] or q.shape[1] != tokens.Q.shape[1]:
            raise ValueError(
                f"refinement: conv layer {layer} has tokens p {tuple(p.shape)} / q {tuple(q.shape)}, the adapter "
                f"expects Cout={tokens.P.shape[1]}, Cin={tokens.Q.shape[1]}"
            )
        size = tokens.num_tokens
        if p.shape[0] > size:
            u, s, vh = torch.linalg.svd(p.T.double() @ q.double(), full_matrices=False)
            root = s[:size].sqrt()
            p = (root[:, None] * u[:, :size].T).to(tokens.P)
            q = (root[:, None] * vh[:size]).to(tokens.Q)
            summary["truncated"].append(layer)
        elif p.shape[0] < size:
            summary["padded"].append(layer)
        count = p.shape[0]
        scale_p = p.square().mean(1).sqrt().clamp_min(1e-12)
        scale_q = q.square().mean(1).sqrt().clamp_min(1e-12)
        tokens.P[:count] = p / scale_p[:, None]
        tokens.A[:count] = scale_p
        tokens.Q[:count] = q / scale_q[:, None]
        tokens.B[:count] = scale_q
        tokens.A[count:] = 0
        summary["copied"].append(layer)
    return summary


def adapt_oneshot(
    generator: nn.Module,
    reference: torch.Tensor,
    w_r: torch.Tensor,
    reconstruction_loss: nn.Module,
    style_loss: nn.Module,
    *,
    adapter: Optional[Adapter] = None,
    num_refined: Optional[int] = None,
    num_tokens: int = 256,
    scale_init: Optional[float] = None,
    init_refinement: Optional[Refinement] = None,
    reference_noise: Optional[Sequence[torch.Tensor]] = None,
    iterations: int = 600,
    batch_size: int = 1,
    lr: float = 1e-3,
    lr_min: Optional[float] = 1e-4,
    betas: tuple[float, float] = (0.0, 0.999),
    style_weight: float = 1.0,
    mix_index: Optional[int] = None,
    truncation: float = 0.7,
    loss_size: int = 256,
    seed: int = 0,
    num_samples: int = 4,
    work_dir: Optional[str | os.PathLike] = None,
    checkpoint_every: int = 50,
    sample_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    metadata: Optional[dict[str, Any]] = None,
    distributed: Optional[DistributedContext] = None,
    bf16: bool = False,
) -> tuple[Adapter, list[dict[str, float]]]:
    """One-shot adaptation to a reference image (GOGA's setting with the paper's Eq. 6 + SWD).

    generator: the frozen refinestyle.Generator.
    reference: float [1, 3, H, W] in [-1, 1] (resized to the generator's size).
    w_r: float [1, n_latent, style_dim], the reference's inverted code.
    reconstruction_loss: refinestyle.losses.ReconstructionLoss (or any (x, y) -> (loss, parts)
        or -> loss), compared at min(loss_size, size) px.
    style_loss: an SWDStyleLoss (its reference is set here) or any module images -> scalar.
    adapter / num_refined / num_tokens / scale_init: as adapt_text.
    init_refinement: the inverter's Refinement for the reference (batch 1), to initialise
        the tokens (see init_tokens_from_refinement); None keeps the random init.
    reference_noise: noise maps for rendering w_r (e.g. the projection's); default: the
        generator's stored noise.
    iterations, batch_size, lr, betas: GOGA's 600, 1, 1e-3, (0, 0.999).
    lr_min: GOGA's cosine schedule takes the rate from lr down to 1e-4 (see cosine_lr); None
        keeps it constant.
    style_weight: weight of the SWD style term (normalised SWD, see swd.py; 1.0).
    mix_index: w_g takes rows < mix_index from random content codes, the rest from w_r
        (default: default_mix_index(n_latent), 8 at 1024 px).
    truncation: psi of the random content codes (0.7).
    seed, num_samples, work_dir, checkpoint_every, sample_every, resume, progress, metadata,
        distributed, bf16: as adapt_text (each process renders its share of the style batch; every
        process renders w_r for the reconstruction term, whose gradient is the same on all).
    Returns (adapter, loss history).
    """
    device = _device_of(generator)
    size = generator.size
    if reference.ndim != 4 or reference.shape[:2] != (1, 3):
        raise ValueError(f"reference: expected one image [1, 3, H, W] in [-1, 1], got {tuple(reference.shape)}")
    if tuple(w_r.shape) != (1, generator.n_latent, generator.style_dim):
        raise ValueError(
            f"w_r: expected [1, {generator.n_latent}, {generator.style_dim}], got {tuple(w_r.shape)}"
        )
    reference = reference.to(device, torch.float32)
    if reference.shape[-2:] != (size, size):
        reference = F.interpolate(reference, size=(size, size), mode="area" if reference.shape[-1] > size else "bilinear")
    w_r = w_r.to(device, torch.float32).detach()
    mix_index = default_mix_index(generator.n_latent) if mix_index is None else mix_index
    if not 0 <= mix_index <= generator.n_latent:
        raise ValueError(f"mix_index: expected an integer in [0, {generator.n_latent}], got {mix_index}")
    compare = min(loss_size, size)
    share = batch_share(batch_size, distributed)

    def for_loss(x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, compare) if x.shape[-1] != compare else x

    reference_small = for_loss(reference)
    if hasattr(style_loss, "set_reference"):
        style_loss.set_reference(reference)
    mean = _mean_latent(generator, truncation, seed)
    if reference_noise is None:
        reference_noise = [getattr(generator.noises, f"noise_{i}") for i in range(generator.num_layers)]
    reference_noise = [n.to(device) for n in reference_noise]

    settings = _training_metadata(
        iterations=iterations, batch_size=batch_size, lr=lr, lr_min=lr_min, betas=betas, style_weight=style_weight,
        mix_index=mix_index, truncation=truncation, seed=seed, bf16=bf16,
        reconstruction_weights=getattr(reconstruction_loss, "weights", None), loss_size=loss_size,
        init_from_inverter=init_refinement is not None, loss="reconstruction(Eq.6)+swd",
    )
    info = {"kind": "oneshot", "training": settings, **(metadata or {})}
    adapter = _adapter_for_run(generator, adapter, num_refined, num_tokens, scale_init, info, seed)
    if init_refinement is not None and not (resume and work_dir and (Path(work_dir) / CHECKPOINT_NAME).is_file()):
        adapter.metadata["token_init"] = init_tokens_from_refinement(adapter, init_refinement)

    def reconstruction(generated: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        result = reconstruction_loss(for_loss(generated), reference_small)
        if isinstance(result, tuple):
            total, parts = result
            return total, {f"rec_{k}": float(v) for k, v in parts.items() if k != "total"}
        return result, {}

    def step_loss(refinement: Refinement, step: int, rng: torch.Generator):
        rec, logs = reconstruction(generator.synthesis(w_r, refinement=refinement, noise=reference_noise))
        content = sample_codes(generator, batch_size, rng, truncation, mean)[share]
        w_g = mixed_codes(content, w_r, mix_index)
        noise = [n[share] for n in _noise(generator, batch_size, rng, device)]
        synthesized = generator.synthesis(w_g, refinement=refinement, noise=noise)
        if isinstance(style_loss, SWDStyleLoss):
            # the SWD's random directions come from the step's generator too: the same on every
            # process, and again when a run resumes
            directions_rng = torch.Generator(device).manual_seed(int(torch.randint(2**62, (), generator=rng)))
            style = style_loss(synthesized, generator=directions_rng)
        else:
            style = style_loss(synthesized)
        logs.update(rec=rec.item(), style=style.item())
        return rec + style_weight * style, logs

    sample_content, sample_noise = _sample_inputs(generator, num_samples, seed, truncation, mean)

    def sample_fn(refinement: Refinement):
        # row 1: the reference, then the frozen generator's samples; row 2: G_hat(w_r), then the adapted samples
        source = generator.synthesis(sample_content, noise=sample_noise)
        adapted = generator.synthesis(sample_content, refinement=refinement, noise=sample_noise)
        rebuilt = generator.synthesis(w_r, refinement=refinement, noise=reference_noise)
        return torch.cat([reference, source, rebuilt, adapted]), num_samples + 1

    history = train_tokens(
        generator, adapter, step_loss, iterations=iterations, lr=lr, betas=betas, seed=seed, work_dir=work_dir,
        checkpoint_every=checkpoint_every, sample_every=sample_every, sample_fn=sample_fn, resume=resume,
        progress=progress, description="adapt-oneshot", distributed=distributed, bf16=bf16, lr_min=lr_min,
    )
    adapter.metadata["training"]["steps_done"] = _steps_done(history)
    return adapter, history


def save_w_plus(
    path: str | os.PathLike,
    w_plus: torch.Tensor,
    noise: Optional[Sequence[torch.Tensor]] = None,
    origin: Optional[dict[str, Any]] = None,
) -> None:
    """Cache an inverted code (and its noise maps) so that a resumed run does not invert again.

    origin: what the code was made from (the reference's sha256, the generator's fingerprint, the
    projection's settings...), for the run that finds the file to tell whether it is its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w_plus": w_plus.detach().cpu(), "noise": None if noise is None else [n.detach().cpu() for n in noise],
                "origin": origin}, path)


def load_w_plus(
    path: str | os.PathLike,
) -> tuple[torch.Tensor, Optional[list[torch.Tensor]], Optional[dict[str, Any]]]:
    """(w_plus, noise maps or None, origin or None for a file that does not record it) from save_w_plus's
    file; ValueError naming the file when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["w_plus"], state["noise"], state.get("origin")
    except Exception as error:  # a damaged file raises pickle's, zip's or torch's errors; a foreign one KeyError
        raise ValueError(f"{path}: not a readable cached code ({_first_line(error)})") from error


def history_summary(history: list[dict[str, float]], window: int = 10) -> dict[str, float]:
    """Mean of every logged value over the first and the last `window` steps (for reports).

    The window shrinks to half the history (at least 1 step) so that the two means never
    share steps; the summary's "window" entry says how many steps each mean covers.
    """
    if not history:
        return {}
    keys = list(dict.fromkeys(k for entry in history for k in entry if k != "step"))
    window = max(1, min(window, len(history) // 2))
    first, last = history[:window], history[-window:]
    summary = {"window": window}
    for key in keys:  # a resumed run may log other terms (e.g. the ID loss switched off): each over its own steps
        for name, part in (("first", first), ("last", last)):
            values = [entry[key] for entry in part if key in entry]
            summary[f"{key}_{name}"] = sum(values) / len(values) if values else None
    return summary


def write_history(path: str | os.PathLike, history: list[dict[str, float]]) -> None:
    """The loss history as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(entry) + "\n" for entry in history))
