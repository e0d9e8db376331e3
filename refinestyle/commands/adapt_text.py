"""Adapt a frozen generator to a text-described domain by training only refinement tokens (CLIP directional loss).

StyleGAN-NADA's setting with RefineStyle's tokens (paper Sec. 3.4, Eq. 7): the change of
the CLIP image embedding between the frozen and the refined generator is aligned with
the change of the CLIP text embedding from --source to --target (prompt templates
averaged), with OpenAI's CLIP ViT-B/16 and ViT-B/32 loaded from local files. Paper
defaults: Adam lr 1e-3, 300 steps, batch 2, all conv layers with L = 256 tokens
(2.98M trainable parameters at 1024 px; NADA fine-tunes 26.7M).

Writes the adapter to --out (safetensors) and, in --work-dir (default: --out without its
suffix, plus ".run"), checkpoint.pt, samples/step_*.png (row 1: frozen generator, row 2:
adapted, for fixed seeds), loss.png and history.jsonl. --resume continues an interrupted run
(with the checkpoint's settings; --iterations is the total).

example:
  refinestyle adapt-text --generator ffhq.pt --source photo --target "pencil sketch" \\
      --clip-vit-b16 ViT-B-16.pt --clip-vit-b32 ViT-B-32.pt --out sketch.safetensors
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

from refinestyle.adaptation.clip_loss import add_clip_arguments
from refinestyle.commands import (
    add_compile_argument,
    device_name,
    interrupted_exit_status,
    output_file,
    output_folder,
    positive_int,
    report_error,
)
from refinestyle.weights import default_device


def add_common_training_arguments(parser: argparse.ArgumentParser, *, iterations: int, batch_size: int) -> None:
    """Options shared by adapt-text and adapt-oneshot."""
    parser.add_argument("--generator", default=None, metavar="PATH",
                        help="generator checkpoint: rosinality .pt / .safetensors or NVlabs .pkl "
                             "(default: $REFINESTYLE_GENERATOR)")
    parser.add_argument("--out", type=Path, required=True, help="the adapter file to write (.safetensors)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for checkpoint, sample grids and loss curves (default: OUT without suffix + .run)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    parser.add_argument("--restart", action="store_true", help="discard a checkpoint in --work-dir and start over")
    parser.add_argument("--iterations", type=int, default=iterations, help=f"training steps (default {iterations})")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"codes per step (default {batch_size})")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--num-tokens", type=int, default=256, help="L, tokens per refined layer (default 256)")
    parser.add_argument("--num-refined", type=int, default=None,
                        help="refine the last N conv layers (default: all, 17 at 1024 px)")
    parser.add_argument("--scale-init", type=float, default=None, help="initial scales A, B (default 0.01)")
    parser.add_argument("--truncation", type=float, default=0.7,
                        help="truncation psi of the training codes (adapt-text: 1, none, as StyleGAN-NADA; "
                             "adapt-oneshot: 0.7, GOGA's content codes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("--sample-every", type=int, default=50, help="steps between sample grids (default 50, 0: off)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    parser.add_argument("--num-samples", type=positive_int, default=4, help="fixed seeds shown in the sample grids (default 4)")
    parser.add_argument("--device", default=None, type=device_name, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "reference"),
                        help="op backend (default auto: triton on CUDA, torch on CPU)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast for the generator and the loss networks (the tokens stay float32)")
    add_compile_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="photo", help='the source domain\'s description (default "photo")')
    parser.add_argument("--target", required=True, help='the target domain\'s description, e.g. "pencil sketch"')
    add_common_training_arguments(parser, iterations=300, batch_size=2)
    parser.set_defaults(truncation=1.0)  # StyleGAN-NADA trains on untruncated codes
    parser.add_argument("--sample-truncation", type=float, default=0.7,
                        help="truncation psi of the sample grids' fixed codes (default 0.7, as StyleGAN-NADA's)")
    add_clip_arguments(parser)
    parser.add_argument("--clip-weights", type=float, nargs="+", default=None, metavar="W",
                        help="weight of each CLIP model in the loss, in the order loaded (default: equal)")


# seeds are combined with the step number into one 64-bit seed per step: larger ones overflow
MAX_SEED = 2**32


def check_positive(option: str, value: float) -> None:
    """ValueError naming `option` unless `value` is a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option}: expected a positive number, got {value}")


def check_training_options(args) -> None:
    """ValueError naming the first option of add_common_training_arguments whose value means nothing."""
    # 0 iterations is allowed: it writes the initial tokens (with adapt-oneshot --init-from-inverter, the inverter's)
    for name, low in (("iterations", 0), ("batch_size", 1), ("num_tokens", 1), ("num_samples", 1),
                      ("sample_every", 0), ("checkpoint_every", 0)):
        value = getattr(args, name)
        if value < low:
            kind = "a positive integer" if low else "a non-negative integer"
            raise ValueError(f"--{name.replace('_', '-')}: expected {kind}, got {value}")
    if args.num_refined is not None and args.num_refined < 1:
        raise ValueError(f"--num-refined: expected a positive integer, got {args.num_refined}")
    if not 0 <= args.seed < MAX_SEED:
        raise ValueError(f"--seed: expected an integer in [0, 2**32), got {args.seed}")
    check_positive("--lr", args.lr)
    if args.scale_init is not None:  # A = B = 0 is a saddle point: every token's gradient is 0, nothing trains
        check_positive("--scale-init", args.scale_init)
    # psi 0 makes every code the mean w; psi > 1 would be ignored (sample_codes truncates only below 1)
    if not (math.isfinite(args.truncation) and 0 < args.truncation <= 1):
        raise ValueError(f"--truncation: expected a number in (0, 1], got {args.truncation}")


def check_output_paths(args, work_dir: Path) -> None:
    """ValueError naming --out / --work-dir when the adapter or the run's files could not be written there
    (found now, not after the training)."""
    for option, path, check in (("--out", args.out, output_file), ("--work-dir", work_dir, output_folder)):
        try:
            check(str(path))
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{option}: {error}") from None
    if Path(args.out).absolute() == Path(work_dir).absolute():  # the adapter could not be saved after the training
        raise ValueError(
            f"--out: {args.out} is also the run's folder (--work-dir, by default --out with the suffix .run); "
            "give the adapter file another name, such as sketch.safetensors"
        )


def check_against_generator(args, generator) -> None:
    """ValueError naming the option whose value does not fit the loaded generator."""
    if args.num_refined is not None and args.num_refined > generator.num_layers:
        raise ValueError(
            f"--num-refined: this generator has {generator.num_layers} conv layers, got {args.num_refined}"
        )


def prepare_run(args, context=None) -> tuple[Path, bool]:
    """(work dir, resume?) after checking the numeric options, the output paths and the checkpoint situation.

    context: the run's DistributedContext (None: one process); only rank 0 deletes or notes.
    """
    from refinestyle.adaptation.train import CHECKPOINT_NAME

    check_training_options(args)
    if args.resume and args.restart:
        raise ValueError("--resume and --restart exclude each other")
    if context is not None and args.batch_size % context.world_size:
        raise ValueError(
            f"--batch-size: the batch of all {context.world_size} processes together, so a multiple of "
            f"{context.world_size}; got {args.batch_size}"
        )
    work_dir = args.work_dir if args.work_dir is not None else args.out.with_suffix(".run")
    check_output_paths(args, work_dir)
    checkpoint = work_dir / CHECKPOINT_NAME
    if checkpoint.is_file() and not (args.resume or args.restart):
        raise ValueError(f"{checkpoint} exists: pass --resume to continue that run or --restart to start over")
    is_main = context is None or context.is_main
    if args.resume and not checkpoint.is_file() and is_main:
        print(f"note: no checkpoint in {work_dir}, starting a new run", file=sys.stderr)
    if context is not None:
        context.barrier()  # every process has looked at the checkpoint before rank 0 deletes it
    if args.restart and is_main:  # the earlier run's files too: its sample grids would pass for the new run's
        for stale in [checkpoint, work_dir / "loss.png", work_dir / "history.jsonl", *work_dir.glob("samples/step_*.png")]:
            stale.unlink(missing_ok=True)
    return work_dir, args.resume


def distributed_context(args):
    """The run's DistributedContext: one process, or torchrun's (its process group lives until exit).

    Without torchrun the device is --device (default: cuda when available); under torchrun
    each process takes cuda:LOCAL_RANK (or the CPU with --device cpu, over gloo).
    """
    from refinestyle.distributed import setup_distributed

    return setup_distributed(args.device or default_device())


def load_frozen_generator(args, device):
    from refinestyle.checkpoints import load_generator

    generator = load_generator(args.generator, device=device, backend=args.backend)
    if args.compile is not None:
        generator.compile_synthesis(mode=args.compile)
    return generator.eval().requires_grad_(False)


def report(adapter, history, out: Path, work_dir: Path) -> None:
    from refinestyle.adaptation.train import history_summary, write_history

    write_history(work_dir / "history.jsonl", history)
    summary = history_summary(history)
    loss = ""
    if "loss_first" in summary:
        steps = f"{summary['window']} step" + ("s" if summary["window"] > 1 else "")
        loss = f"; loss {summary['loss_first']:.4g} (first {steps}) -> {summary['loss_last']:.4g} (last {steps})"
    where = f"; samples and curves in {work_dir}" if history else " (no step taken)"
    print(f"wrote {out}: {adapter.num_trainable():,} trainable parameters{loss}{where}")


def train_and_save(
    args, work_dir: Path, resume: bool, adapt: Callable, inputs: tuple, *, context=None, **options
) -> int:
    """Train an adapter with adapt(*inputs, **options), save it to --out and print the summary.

    `adapt` (adapt_text or adapt_oneshot) also gets work_dir, resume and the training options
    of add_common_training_arguments under their own names (--no-progress as progress=False),
    and `context` (a DistributedContext under torchrun) as `distributed`; rank 0 saves.
    Returns the exit status: 0; 2 after a ValueError (printed); 130 after Ctrl-C (143 after
    SIGTERM), the checkpoint in work_dir keeping the progress.
    """
    try:
        adapter, history = adapt(
            *inputs,
            num_refined=args.num_refined,
            num_tokens=args.num_tokens,
            scale_init=args.scale_init,
            iterations=args.iterations,
            batch_size=args.batch_size,
            lr=args.lr,
            truncation=args.truncation,
            seed=args.seed,
            num_samples=args.num_samples,
            work_dir=work_dir,
            checkpoint_every=args.checkpoint_every,
            sample_every=args.sample_every,
            resume=resume,
            progress=not args.no_progress,
            distributed=context,
            bf16=args.bf16,
            **options,
        )
    except ValueError as error:  # e.g. --resume with settings that do not fit the checkpoint
        return report_error(args, error)
    except KeyboardInterrupt as interrupt:
        if context is None or context.is_main:
            print(f"interrupted: the checkpoint in {work_dir} holds the progress; continue with --resume",
                  file=sys.stderr)
        return interrupted_exit_status(interrupt)
    if context is None or context.is_main:
        adapter.save(args.out)
        report(adapter, history, args.out, work_dir)
    return 0


def main(args: argparse.Namespace) -> int:
    from refinestyle.adaptation.clip_loss import CLIPDirectionalLoss, clip_encoders_from_args
    from refinestyle.adaptation.train import adapt_text
    from refinestyle.checkpoints import CheckpointError
    from refinestyle.weights import MissingWeightsError

    context = distributed_context(args)
    device = context.device
    try:
        for option, text in (("--source", args.source), ("--target", args.target)):
            if not text.strip():
                raise ValueError(f"{option}: expected a description of the domain, got an empty text")
        if not (math.isfinite(args.sample_truncation) and 0 < args.sample_truncation <= 1):
            raise ValueError(f"--sample-truncation: expected a number in (0, 1], got {args.sample_truncation}")
        if args.clip_weights is not None and not (
            all(math.isfinite(w) and w >= 0 for w in args.clip_weights) and sum(args.clip_weights) > 0
        ):
            raise ValueError(f"--clip-weights: expected non-negative numbers, not all 0, got {args.clip_weights}")
        work_dir, resume = prepare_run(args, context)
        generator = load_frozen_generator(args, device)
        check_against_generator(args, generator)
        encoders = clip_encoders_from_args(args, device)
        if args.clip_weights is not None and len(args.clip_weights) != len(encoders):
            raise ValueError(f"--clip-weights: {len(args.clip_weights)} weights for {len(encoders)} CLIP models")
        clip_loss = CLIPDirectionalLoss(encoders, args.source, args.target, weights=args.clip_weights)
    except (MissingWeightsError, CheckpointError, ValueError, TypeError, RuntimeError) as error:
        return report_error(args, error)

    return train_and_save(
        args, work_dir, resume, adapt_text, (generator, clip_loss), context=context,
        sample_truncation=args.sample_truncation,
        metadata={"generator_file": str(args.generator) if args.generator else None},
    )
